"""scripts/inspect_prompts.py: what the model receives, as a user runs it (offline, tokenizer only)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_inspect_prompts_writes_exact_ids_and_a_page(tmp_path, data_dir):
    out, page = tmp_path / "inputs.jsonl", tmp_path / "inputs.html"
    result = subprocess.run(
        [sys.executable, "scripts/inspect_prompts.py", "model=codellama-7b", f"model.tokenizer_id={data_dir}/tokenizers/codellama-7b",
         "benchmark=humaneval", "anchor=nl", "protocol=authors", f"out={out}", f"html={page}", "limit=3", "show=1",
         f"paths.data_dir={data_dir}", f"paths.authors_data_dir={data_dir.parent}/reference/spa-authors/dataset"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "=== HumanEval/0" in result.stdout and "«Check if in given list of numbers" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    first = records[0]
    assert first["input_ids"][0] == 1 and first["masked_input_ids"].count(0) == 1  # BOS, then one <unk>
    assert len(first["masked_input_ids"]) < len(first["input_ids"]) == first["n_prompt_tokens"]
    assert first["anchored_text"] == [first["prompt_text"][s:e] for s, e in first["anchor_spans"]]
    assert "<unk>" in first["masked_prompt_text"] and "Check if" not in first["masked_prompt_text"]
    assert "<mark>Check if in given list" in page.read_text()


def test_inspect_prompts_bad_condition_exits_2(tmp_path, data_dir):
    result = subprocess.run(
        [sys.executable, "scripts/inspect_prompts.py", "anchor=nl+code", "protocol=authors", f"paths.data_dir={data_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "does not exist in the authors' code" in result.stderr
    assert "Traceback" not in result.stderr
