"""Prompt builders with the real tokenizers (no weights): templates, stop strings, relocated anchors."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import evalplus.codegen
import pytest

from eval.benchmarks.data import load_tasks
from eval.errors import ConfigError
from eval.benchmarks.prompts import (
    INSTRUCT_PREFILL,
    INSTRUCTION_PREFIX,
    RESPONSE_PREFIX,
    build_prompt,
    stop_strings,
)
from eval.benchmarks.spans import anchor_char_spans, segment

CONDITIONS = {"humaneval": ("none", "nl", "nl+test", "nl+code", "nl+code+test", "all"), "mbpp": ("none", "nl", "nl+test", "all")}
HUMANEVAL_0_NL = "Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold."


@functools.lru_cache(maxsize=None)
def load_tokenizer(folder: Path):
    """Each real tokenizer is loaded once per test session (test_postprocess.py shares this cache)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tokenizers(tokenizer_dir) -> dict:
    names = ("deepseek-coder-instruct", "qwen2.5-coder-instruct", "codellama-7b", "codegen-350m-mono")
    return {name: load_tokenizer(tokenizer_dir(name)) for name in names}


def test_prefixes_are_evalplus_own() -> None:
    source = inspect.getsource(evalplus.codegen.run_codegen)
    assert f'instruction_prefix = "{INSTRUCTION_PREFIX}"' in source
    assert f'response_prefix = "{RESPONSE_PREFIX}"' in source


def test_stop_strings_follow_evalplus() -> None:
    common = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint("]
    assert stop_strings("humaneval", "base") == [*common, "\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "]
    assert stop_strings("mbpp", "base") == [*common, '\n"""', "\nassert"]
    assert stop_strings("humaneval", "instruct") == stop_strings("mbpp", "instruct") == [*common, "\n```\n"]


@pytest.mark.parametrize("tokenizer_name", ["codegen-350m-mono", "codellama-7b"])
def test_base_style_is_the_stripped_task_prompt(tokenizers: dict, tokenizer_name: str) -> None:
    tasks = load_tasks("humaneval")
    for task_id, lead in (("HumanEval/0", 0), ("HumanEval/2", 2)):  # HumanEval/2 starts with "\n\n"
        prompt = tasks[task_id]["prompt"]
        built = build_prompt(tasks[task_id], "humaneval", "base", "nl+test", tokenizers[tokenizer_name])
        assert built.text == prompt.strip() + "\n"
        assert (built.task_prompt_offset, built.prefill) == (0, "")
        original = segment("humaneval", prompt)
        assert [(s.start - lead, s.end - lead, s.kind) for s in original] == [
            (s.start, s.end, s.kind) for s in built.spans
        ]
        assert built.anchor_spans == [(s - lead, e - lead) for s, e in anchor_char_spans(original, "nl+test")]
    built = build_prompt(tasks["HumanEval/0"], "humaneval", "base", "nl")
    assert [built.text[s:e] for s, e in built.anchor_spans] == [HUMANEVAL_0_NL]


def test_deepseek_instruct_prompt(tokenizers: dict) -> None:
    task = load_tasks("humaneval")["HumanEval/0"]
    built = build_prompt(task, "humaneval", "instruct", "nl", tokenizers["deepseek-coder-instruct"])
    text = built.text
    assert text.startswith("<｜begin▁of▁sentence｜>You are an AI programming assistant, utilizing the Deepseek Coder model")
    assert f"### Instruction:\n{INSTRUCTION_PREFIX}\n```\n{task['prompt'].strip()}\n```\n\n### Response:\n" in text
    assert text.endswith(f"### Response:\n{RESPONSE_PREFIX}\n```python\n")
    assert built.prefill == INSTRUCT_PREFILL and text.endswith(built.prefill)
    assert [text[s:e] for s, e in built.anchor_spans] == [HUMANEVAL_0_NL]
    assert text[built.task_prompt_offset :].startswith("from typing import List\n")
    assert built.stop_strings[-1] == "\n```\n"


def test_qwen_instruct_prompt(tokenizers: dict) -> None:
    task = load_tasks("mbpp")["Mbpp/2"]
    built = build_prompt(task, "mbpp", "instruct", "nl", tokenizers["qwen2.5-coder-instruct"])
    text = built.text
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    assert f"<|im_start|>user\n{INSTRUCTION_PREFIX}\n```\n{task['prompt'].strip()}\n```\n<|im_end|>\n" in text
    assert text.endswith(f"<|im_start|>assistant\n{INSTRUCT_PREFILL}")
    assert [text[s:e] for s, e in built.anchor_spans] == [
        "Write a function to find the shared elements from the given two lists."
    ]


@pytest.mark.parametrize("tokenizer_name", ["deepseek-coder-instruct", "qwen2.5-coder-instruct"])
def test_evalplus_rendering_is_the_generation_prompt_plus_prefill(tokenizers: dict, tokenizer_name: str) -> None:
    tokenizer = tokenizers[tokenizer_name]
    task = load_tasks("humaneval")["HumanEval/10"]
    user = f"{INSTRUCTION_PREFIX}\n```\n{task['prompt'].strip()}\n```\n"
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert build_prompt(task, "humaneval", "instruct", "nl", tokenizer).text == expected + INSTRUCT_PREFILL


@pytest.mark.parametrize("benchmark", ["humaneval", "mbpp"])
@pytest.mark.parametrize("style", ["base", "instruct"])
def test_anchor_text_survives_templating_for_every_task(tokenizers: dict, benchmark: str, style: str) -> None:
    tokenizer = tokenizers["deepseek-coder-instruct"] if style == "instruct" else None
    for task_id, task in load_tasks(benchmark).items():
        prompt = task["prompt"]
        task_spans = segment(benchmark, prompt)
        for condition in CONDITIONS[benchmark]:
            built = build_prompt(task, benchmark, style, condition, tokenizer)
            expected = [prompt[s:e] for s, e in anchor_char_spans(task_spans, condition)]
            assert [built.text[s:e] for s, e in built.anchor_spans] == expected, (task_id, condition)
        assert [(s.kind, built.text[s.start : s.end]) for s in built.spans] == [
            (s.kind, s.text(prompt)) for s in task_spans
        ], task_id


def test_instruct_needs_a_real_chat_template(tokenizers: dict) -> None:
    task = load_tasks("humaneval")["HumanEval/0"]
    with pytest.raises(ConfigError, match="none was given"):
        build_prompt(task, "humaneval", "instruct", "nl")
    for name in ("codellama-7b", "codegen-350m-mono"):
        with pytest.raises(ConfigError, match="has none.*Use style 'base'"):
            build_prompt(task, "humaneval", "instruct", "nl", tokenizers[name])


def test_build_prompt_rejects_bad_configuration(tokenizers: dict) -> None:
    task = load_tasks("mbpp")["Mbpp/2"]
    with pytest.raises(ConfigError, match="Unknown prompt style 'chat'"):
        build_prompt(task, "mbpp", "chat", "nl", tokenizers["deepseek-coder-instruct"])
    with pytest.raises(ConfigError, match="not defined for MBPP"):
        build_prompt(task, "mbpp", "base", "nl+code+test")
