"""scripts/bench_gpu.py: the GPU measurement script, proven on the CPU by its --smoke mode.

The data are staged as for the device (``--stage``), and the smoke reads the staged model inputs, the path the
device takes (no evalplus there); the harness builds them too, here, and they must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PARTS = ("spa_vs_plain", "humaneval_full", "static_cache", "8bit", "static_cache_compile")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_gpu.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir, tokenizer_dir):
    staged = tmp_path_factory.mktemp("device")
    result = _run("--stage", str(staged), "--data-dir", str(data_dir), "--tokenizer", str(tokenizer_dir("deepseek-coder-instruct")))
    assert result.returncode == 0, result.stdout + result.stderr
    out = staged / "decoding_gpu-smoke.json"
    result = _run("--smoke", "--data-dir", str(staged), "--tokenizer", str(staged / "tokenizers" / "deepseek-coder-instruct"),
                  "--inputs", "staged", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return staged, json.loads(out.read_text()), result.stdout


def test_stage_writes_what_the_device_needs(smoke):
    staged, _, _ = smoke
    assert (staged / "evalplus" / "HumanEvalPlus-v0.1.10.jsonl.gz").is_file()
    assert (staged / "tokenizers" / "deepseek-coder-instruct" / "tokenizer.json").is_file()
    inputs = json.loads((staged / "humaneval-inputs.json").read_text())
    assert len(inputs["tasks"]) == 164 and inputs["protocol"] == "evalplus" and inputs["anchor"] == "nl"
    assert inputs["masking"] == "token" and inputs["dataset"]["version"] == "v0.1.10"
    first = inputs["tasks"][0]
    assert first["task_id"] == "HumanEval/0" and first["input_ids"][0] == 32013  # DeepSeek-Coder's BOS
    assert len(first["masked_input_ids"]) == len(first["input_ids"]) == len(first["anchor_mask"])
    assert all(m == 32014 for m, a in zip(first["masked_input_ids"], first["anchor_mask"]) if a) and sum(first["anchor_mask"]) > 0
    assert all(t["max_new_tokens"] == 512 for t in inputs["tasks"])


def test_smoke_records_every_part(smoke):
    _, report, stdout = smoke
    assert report["mode"] == "smoke" and list(report["parts"]) == list(PARTS)
    env = report["environment"]
    for key in ("torch", "transformers", "python", "device", "dtype", "attn_implementation"):
        assert env[key], key
    assert env["dtype"] == "bfloat16" and env["attn_implementation"] == "sdpa"
    assert report["model"]["hidden_size"] == 64 and report["model"]["num_hidden_layers"] == 2
    for name, part in report["parts"].items():
        assert "error" not in part, (name, part.get("error"), part.get("traceback"))
        assert part["elapsed_s"] >= 0
        assert f"== {name}" in stdout
    assert 0 < report["total_seconds"] < report["budget_s"]


def test_spa_vs_plain(smoke):
    part = smoke[1]["parts"]["spa_vs_plain"]
    assert {(r["batch_size"], r["method"]) for r in part["results"]} == {(b, m) for b in (1, 2) for m in ("plain_greedy", "spa_engine")}
    for r in part["results"]:
        assert r["median_seconds"] > 0 and r["tokens_per_second"] > 0 and r["warmup_seconds"] > 0
        assert "peak_allocated_mib" in r  # None on a CPU
    for batch, target in (("batch_1", 1.15), ("batch_2", 1.3)):
        ratio = part["ratios"][batch]
        assert ratio["spa_cost_vs_plain"] > 0 and ratio["target_cost"] == target and isinstance(ratio["meets_target"], bool)


def test_static_cache_and_compile(smoke):
    parts = smoke[1]["parts"]
    static = parts["static_cache"]
    assert {r["method"] for r in static["results"]} == {"plain_dynamic_cache", "plain_static_cache"}
    assert all(r["tokens_per_second"] > 0 for r in static["results"])
    assert all(static["ratios"][f"batch_{b}"]["static_speedup_vs_dynamic"] > 0 for b in (1, 2))
    compiled = parts["static_cache_compile"]
    if "skipped" in compiled:
        assert compiled["skipped"]
    else:
        for r in compiled["results"]:
            assert r["tokens_per_second"] > 0
            assert r["compile_warmup_seconds"]["first_call"] > 0 and r["compile_warmup_seconds"]["second_call"] > 0
            assert 0 <= r["rows_equal_to_dynamic"] <= r["batch_size"]
        assert all(compiled["ratios"][f"batch_{b}"]["compiled_speedup_vs_dynamic"] > 0 for b in (1, 2))


def test_humaneval_full_generation(smoke):
    part = smoke[1]["parts"]["humaneval_full"]
    assert part["n_tasks"] == part["completed_tasks"] == 3  # 164 on the device
    assert part["inputs_source"].startswith("staged") and part["matches_harness"] is True
    assert part["dataset"]["file_checked"] is True
    assert part["seconds"] > 0 and part["tokens_per_second"] > 0 and len(part["chunk_seconds"]) == 2  # 2 tasks per call
    assert part["generated_tokens"] == 3 * 8 and part["all_full_length"] is True
    assert part["protocol"] == "evalplus" and part["anchor"] == "nl" and part["omega"] == 1.3 and part["eos"] == "none"


def test_8bit_measured_or_skipped_with_a_reason(smoke):
    part = smoke[1]["parts"]["8bit"]
    if "skipped" in part:
        assert isinstance(part["skipped"], str) and len(part["skipped"]) > 10
    else:
        assert part["cost_8bit_vs_bf16"] > 0 and all(r["tokens_per_second"] > 0 for r in part["results"])
