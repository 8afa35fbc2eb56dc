"""Prompt segmentation: invariants over every task, hand-checked golden spans, anchor conditions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.benchmarks.data import load_tasks
from eval.errors import ConfigError, DatasetError
from eval.benchmarks.spans import ANCHOR_CONDITIONS, Span, anchor_char_spans, segment, validate_condition

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = ("humaneval", "mbpp")


def golden(benchmark: str) -> list[dict]:
    return json.loads((FIXTURES / f"spans_{benchmark}.json").read_text(encoding="utf-8"))["tasks"]


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_prompt_is_fully_segmented(benchmark: str) -> None:
    for task_id, task in load_tasks(benchmark).items():
        prompt = task["prompt"]
        spans = segment(benchmark, prompt)
        covered = [False] * len(prompt)
        for previous, span in zip([None, *spans], spans):
            assert span.start < span.end, (task_id, span)
            assert not prompt[span.start].isspace() and not prompt[span.end - 1].isspace(), (task_id, span)
            if previous is not None:
                assert previous.end <= span.start, (task_id, "overlap or unsorted", previous, span)
                assert previous.kind != span.kind, (task_id, "same-kind neighbours are one span", span)
            covered[span.start : span.end] = [True] * (span.end - span.start)
        unlabeled = [i for i, char in enumerate(prompt) if not char.isspace() and not covered[i]]
        assert not unlabeled, (task_id, "unlabeled characters", [prompt[i] for i in unlabeled])
        assert any(span.kind == "nl" and span.text(prompt).strip() for span in spans), task_id


def test_mbpp_prompts_are_quote_sentence_assert_quote() -> None:
    for task_id, task in load_tasks("mbpp").items():
        prompt = task["prompt"]
        spans = segment("mbpp", prompt)
        assert [span.kind for span in spans] == ["code", "nl", "test", "code"], task_id
        assert spans[0].text(prompt) == spans[3].text(prompt) == '"""', task_id
        assert spans[2].text(prompt).startswith("assert "), task_id


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_golden_segmentations(benchmark: str) -> None:
    tasks = load_tasks(benchmark)
    for case in golden(benchmark):
        prompt = tasks[case["task_id"]]["prompt"]
        expected = [(span["kind"], "\n".join(span["lines"])) for span in case["spans"]]
        actual = [(span.kind, span.text(prompt)) for span in segment(benchmark, prompt)]
        assert actual == expected, case["task_id"]


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_golden_cases_span_the_id_range(benchmark: str) -> None:
    ids = list(load_tasks(benchmark))
    positions = sorted(ids.index(case["task_id"]) for case in golden(benchmark))
    assert len(positions) >= 20
    assert positions[0] == 0 and positions[-1] >= len(ids) - 10
    assert max(b - a for a, b in zip(positions, positions[1:])) <= 20


def test_definitions_and_inline_examples_stay_nl() -> None:
    tasks = load_tasks("humaneval")
    kinds_of = {
        text.strip(): span.kind
        for task_id in ("HumanEval/46", "HumanEval/119", "HumanEval/130")
        for span in segment("humaneval", tasks[task_id]["prompt"])
        for text in span.text(tasks[task_id]["prompt"]).splitlines()
    }
    assert kinds_of["fib4(n) -> fib4(n-1) + fib4(n-2) + fib4(n-3) + fib4(n-4)."] == "nl"
    assert kinds_of["fib4(0) -> 0"] == "nl"
    assert kinds_of["are balanced. For example: the string '(())()' is good, while the string"] == "nl"
    assert kinds_of["tri(n) = 1 + n / 2, if n is even."] == "nl"
    assert kinds_of["tri(4) = 3"] == "test"
    assert kinds_of["first n + 1 numbers of the Tribonacci sequence."] == "nl"


def test_segment_rejects_prompts_it_cannot_split() -> None:
    with pytest.raises(DatasetError, match="no docstring"):
        segment("humaneval", "def f(x):\n    return x\n")
    with pytest.raises(DatasetError, match="not valid Python"):
        segment("humaneval", "def f(:\n")
    with pytest.raises(DatasetError, match="Unknown benchmark"):
        segment("apps", '"""\nWrite f.\n"""\n')


def test_validate_condition() -> None:
    for condition in ANCHOR_CONDITIONS:
        assert validate_condition("humaneval", condition) == condition
    assert [c for c in ANCHOR_CONDITIONS if _valid("mbpp", c)] == ["none", "nl", "nl+test", "all"]
    with pytest.raises(ConfigError, match=r"'nl\+tests'.*none, nl, nl\+test, nl\+code, nl\+code\+test, all"):
        validate_condition("humaneval", "nl+tests")
    with pytest.raises(ConfigError, match="no starting code.*Use 'nl' or 'nl\\+test'"):
        validate_condition("mbpp", "nl+code")


def _valid(benchmark: str, condition: str) -> bool:
    try:
        validate_condition(benchmark, condition)
    except ConfigError:
        return False
    return True


def test_anchor_char_spans_on_humaneval_0() -> None:
    prompt = load_tasks("humaneval")["HumanEval/0"]["prompt"]
    spans = segment("humaneval", prompt)
    code, nl, test, closing = spans
    selected = {condition: anchor_char_spans(spans, condition) for condition in ANCHOR_CONDITIONS}
    assert selected["none"] == []
    assert [prompt[s:e] for s, e in selected["nl"]] == [
        "Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold."
    ]
    assert selected["nl+test"] == [(nl.start, test.end)]
    assert selected["nl+code"] == [(code.start, nl.end), (closing.start, closing.end)]
    assert selected["nl+code+test"] == selected["all"] == [(code.start, closing.end)]
    assert prompt[code.start : closing.end] == prompt.strip()


def test_anchor_char_spans_keeps_separate_nl_regions_apart() -> None:
    prompt = load_tasks("humaneval")["HumanEval/130"]["prompt"]
    nl_ranges = anchor_char_spans(segment("humaneval", prompt), "nl")
    assert len(nl_ranges) == 2
    assert prompt[slice(*nl_ranges[1])].startswith("You are given a non-negative integer number n")


def test_anchor_char_spans_on_mbpp_all_includes_quotes() -> None:
    prompt = load_tasks("mbpp")["Mbpp/2"]["prompt"]
    spans = segment("mbpp", prompt)
    assert anchor_char_spans(spans, "all") == [(0, len(prompt.rstrip()))]
    assert [prompt[s:e] for s, e in anchor_char_spans(spans, "nl+test")] == [
        "Write a function to find the shared elements from the given two lists.\n"
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"
    ]


def test_anchor_char_spans_sorts_its_input() -> None:
    spans = [Span(10, 12, "test"), Span(0, 4, "nl"), Span(6, 8, "code")]
    assert anchor_char_spans(spans, "nl+test") == [(0, 4), (10, 12)]
    assert anchor_char_spans(spans, "all") == [(0, 12)]
    with pytest.raises(ConfigError, match="Unknown anchor condition"):
        anchor_char_spans(spans, "code")
