"""Post-processing: stop strings, code extraction, EvalPlus's sanitizer and the raw-program fallback."""

from __future__ import annotations

import ast

import pytest
from evalplus.sanitize import sanitize

from eval.benchmarks.data import load_tasks
from eval.errors import ConfigError
from eval.benchmarks.postprocess import extract_code, sanitizer_damage, to_solution, truncate_at_stop
from eval.benchmarks.prompts import build_prompt
from tests.test_prompts import load_tokenizer


@pytest.fixture(scope="module")
def deepseek(tokenizer_dir):
    return load_tokenizer(tokenizer_dir("deepseek-coder-instruct"))


def test_truncate_at_the_earliest_stop_string() -> None:
    assert truncate_at_stop("a\nprint(1)\ndef g", ["\ndef ", "\nprint("]) == "a"
    assert truncate_at_stop("no stop here", ["\ndef "]) == "no stop here"


@pytest.mark.parametrize(
    ("response", "code"),
    [
        ("Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unterminated block
        ("```\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),  # bare fence at the start opens
        # The prefilled block's continuation: a bare fence closes it, later blocks are explanation.
        ("def f():\n    return 1\n```\n\nUsage:\n```python\nprint(f())\n```", "def f():\n    return 1\n"),
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence at all
    ],
)
def test_extract_code(response: str, code: str) -> None:
    assert extract_code(response) == code


def test_base_solution_is_prompt_plus_truncated_completion() -> None:
    task = load_tasks("humaneval")["HumanEval/0"]
    built = build_prompt(task, "humaneval", "base", "nl")
    completion = "    for i, a in enumerate(numbers):\n\t\tfor b in numbers[i + 1:]:\n\t\t\tif abs(a - b) < threshold:\n\t\t\t\treturn True\n    return False\n"
    generated = completion + "\n\ndef check(candidate):\n    assert candidate([1.0], 0.5) is False\n"
    result = to_solution(task, "humaneval", "base", generated, built)
    expected_raw = task["prompt"].strip() + "\n" + completion.replace("\t", "    ")
    assert result["raw_solution"] == expected_raw + "\n"
    assert result["sanitized_ok"] and result["fallback_reason"] is None
    assert result["solution"] == sanitize(result["raw_solution"], entrypoint="has_close_elements")
    assert result["solution"].startswith("from typing import List\ndef has_close_elements(")
    assert "check" not in result["solution"]


def test_instruct_solution_is_the_code_of_the_answer(deepseek) -> None:
    task = load_tasks("mbpp")["Mbpp/2"]
    built = build_prompt(task, "mbpp", "instruct", "nl", deepseek)
    code = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
    generated = code + "\n# Test\nassert set(similar_elements((3, 4), (4, 5))) == {4}\n```\n\nThis uses sets.\n```python\nx = 1\n```"
    result = to_solution(task, "mbpp", "instruct", generated, built)
    assert result["raw_solution"] == code + "\n# Test\nassert set(similar_elements((3, 4), (4, 5))) == {4}"
    assert result["solution"] == code.strip()
    assert result["sanitized_ok"]


def test_driver_code_is_still_sanitized_away() -> None:
    raw = "def f(x):\n    result = x + 1\n    return result\n\nfor result in range(3):\n    assert f(result) == 0\nprint(f(1))\n"
    assert sanitizer_damage(raw, sanitize(raw, entrypoint="f"), "f") is None
    assert sanitize(raw, entrypoint="f") == "def f(x):\n    result = x + 1\n    return result"


def test_unparseable_raw_program_uses_the_sanitizer_recovery() -> None:
    task = load_tasks("humaneval")["HumanEval/23"]
    built = build_prompt(task, "humaneval", "base", "nl")
    result = to_solution(task, "humaneval", "base", "    return len(string)\n\n  )broken(\n", built)
    assert result["sanitized_ok"]
    assert result["solution"] == "def strlen(string: str) -> int:\n" + _docstring_of(task) + "\n    return len(string)"


def _docstring_of(task: dict) -> str:
    prompt = task["prompt"].strip()
    return prompt[prompt.index('    """') :]


# Correct programs that EvalPlus's sanitizer breaks: (program, entry point, the line it loses).
SANITIZER_GAPS = {
    "decorated helper": (
        "from functools import lru_cache\n\n@lru_cache(maxsize=None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\ndef f(n):\n    return fib(n)\n",
        "def fib(n):",
    ),
    "decorated entry point": (
        "from functools import lru_cache\n\n@lru_cache(maxsize=None)\ndef f(n):\n"
        "    return n if n < 2 else f(n - 1) + f(n - 2)\n",
        "def f(n):",
    ),
    "helper without return": (
        "def fill(out, n):\n    for i in range(n):\n        out.append(i)\n\n"
        "def f(n):\n    out = []\n    fill(out, n)\n    return out\n",
        "def fill(out, n):",
    ),
    "generator helper": (
        "def squares(n):\n    for i in range(n):\n        yield i * i\n\ndef f(n):\n    return list(squares(n))\n",
        "def squares(n):",
    ),
    "tuple-assigned constants": ("LOW, HIGH = 1, 10\n\ndef f(x):\n    return LOW <= x <= HIGH\n", "LOW, HIGH = 1, 10"),
    "augmented constant": ("TOTAL = 0\nTOTAL += 5\n\ndef f():\n    return TOTAL\n", "TOTAL += 5"),
    "table built by a loop": (
        "PRIMES = []\nfor k in range(2, 50):\n    if all(k % p for p in PRIMES):\n        PRIMES.append(k)\n\n"
        "def f(n):\n    return PRIMES[:n]\n",
        "for k in range(2, 50):",
    ),
    "import in try": (
        "try:\n    from math import isqrt\nexcept ImportError:\n    isqrt = None\n\ndef f(n):\n    return isqrt(n)\n",
        "try:",
    ),
    "recursion limit": (
        "import sys\nsys.setrecursionlimit(100000)\n\ndef f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\n",
        "sys.setrecursionlimit(100000)",
    ),
    "redefined entry point (Python keeps the last, the sanitizer the first)": (
        "def f(x):\n    pass\n\ndef f(x):\n    return 2 * x\n",
        "def f(x):",
    ),
}


@pytest.mark.parametrize("gap", sorted(SANITIZER_GAPS))
def test_correct_solution_survives_a_sanitizer_gap(deepseek, gap: str) -> None:
    program, lost_line = SANITIZER_GAPS[gap]
    task = {"task_id": "gap", "prompt": '"""\nWrite f.\nassert f(1) == 1\n"""\n', "entry_point": "f"}
    built = build_prompt(task, "mbpp", "instruct", "nl", deepseek)
    sanitized = sanitize(program, entrypoint="f")
    assert sanitized != program.strip()  # the sanitizer does damage this program
    result = to_solution(task, "mbpp", "instruct", program + "```\n", built)
    assert result["solution"] == result["raw_solution"] == program.removesuffix("\n")
    assert not result["sanitized_ok"]
    assert result["fallback_reason"] == f"the sanitizer dropped top-level code that f() needs: {lost_line!r}"


def test_every_canonical_solution_survives_post_processing() -> None:
    # Mbpp/630's reference solution uses a generator helper, which the sanitizer drops.
    fallbacks = {}
    for benchmark in ("humaneval", "mbpp"):
        for task_id, task in load_tasks(benchmark).items():
            built = build_prompt(task, benchmark, "base", "nl")
            result = to_solution(task, benchmark, "base", task["canonical_solution"], built)
            assert task["entry_point"] in _top_level_functions(result["solution"]), task_id
            if not result["sanitized_ok"]:
                fallbacks[task_id] = result["fallback_reason"]
    assert fallbacks == {
        "Mbpp/630": "the sanitizer dropped top-level code that get_coordinates() needs: 'def adjac(ele, sub = []): '"
    }


def _top_level_functions(program: str) -> set[str]:
    return {node.name for node in ast.parse(program).body if isinstance(node, ast.FunctionDef)}


def test_to_solution_rejects_a_prompt_of_another_style() -> None:
    task = load_tasks("humaneval")["HumanEval/0"]
    built = build_prompt(task, "humaneval", "base", "nl")
    with pytest.raises(ConfigError, match="built as humaneval/base"):
        to_solution(task, "humaneval", "instruct", "pass", built)
