"""Typed character spans of a task prompt and the anchor conditions built from them.

Every prompt is split into spans of three kinds (the paper's §3.6 and Table 2):

* ``nl``: the natural-language task description;
* ``code``: starting code: imports, helper functions (docstrings included), the signature, the
  docstring delimiters, and any other Python syntax of the prompt;
* ``test``: examples of the expected behaviour: doctest ``>>>`` lines with their outputs, "Example" /
  "For example" blocks (header line included), ``f(x) == y`` style lines and MBPP ``assert`` lines.

Conventions (README "Prompt spans"):

* Spans start and end on a non-whitespace character. Whitespace between two spans (line breaks,
  indentation, blank lines) belongs to no span; whitespace inside a span is part of it. Regions of
  the same kind separated only by whitespace form one span, so neighbouring spans differ in kind.
* HumanEval: only the docstring of the *last* function (the one to complete) is split into ``nl`` and
  ``test``; everything else, including its ``\"\"\"`` delimiters and helper functions with their own
  docstrings, is ``code``. Examples written inside a prose sentence (``For example, if ... then ...``)
  stay ``nl``: cutting a sentence would break the description.
* MBPP: the prompt is ``\"\"\"\\n<sentence>\\nassert ...\\n\"\"\"``; the ``\"\"\"`` lines are ``code``
  (Python syntax, not description), the sentence ``nl``, the assert line ``test``. MBPP prompts have
  no starting code, so the ``nl+code*`` conditions are configuration errors there.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Literal

from eval.benchmarks.data import benchmark_spec
from eval.errors import ConfigError, DatasetError

SpanKind = Literal["nl", "code", "test"]


@dataclass(frozen=True)
class Span:
    """A half-open character range ``[start, end)`` of a prompt and what it holds."""

    start: int
    end: int
    kind: SpanKind

    def text(self, prompt: str) -> str:
        return prompt[self.start : self.end]


ANCHOR_CONDITIONS: tuple[str, ...] = ("none", "nl", "nl+test", "nl+code", "nl+code+test", "all")

_CONDITION_KINDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "nl": frozenset({"nl"}),
    "nl+test": frozenset({"nl", "test"}),
    "nl+code": frozenset({"nl", "code"}),
    "nl+code+test": frozenset({"nl", "code", "test"}),
    # The whole prompt (the paper's §3.2); on HumanEval the same characters as nl+code+test.
    "all": frozenset({"nl", "code", "test"}),
}


def validate_condition(benchmark: str, condition: str) -> str:
    """``condition`` if it is a valid anchor condition for ``benchmark``; a ``ConfigError`` otherwise."""
    benchmark_spec(benchmark)
    if condition not in _CONDITION_KINDS:
        raise ConfigError(
            f"Unknown anchor condition {condition!r}. Choose one of {', '.join(ANCHOR_CONDITIONS)} "
            "(the paper's Table 2 rows are nl, nl+test, nl+code and nl+code+test; 'none' is plain "
            "decoding's prompt with nothing anchored, 'all' anchors the whole task prompt)."
        )
    if benchmark == "mbpp" and "code" in condition:
        raise ConfigError(
            f"Anchor condition {condition!r} is not defined for MBPP: MBPP prompts are a task sentence "
            "and a test assert only, with no starting code to anchor (Table 2 has no MBPP entry for it). "
            "Use 'nl' or 'nl+test' on MBPP (or 'all' for the whole prompt)."
        )
    return condition


def anchor_char_spans(spans: list[Span], condition: str) -> list[tuple[int, int]]:
    """The character ranges anchored under ``condition``: sorted, merged, non-overlapping.

    Consecutive selected spans are merged together with the whitespace between them (it belongs to no
    span), so ``all`` is the prompt's whole non-whitespace extent. ``none`` selects nothing.
    """
    if condition not in _CONDITION_KINDS:
        raise ConfigError(f"Unknown anchor condition {condition!r}. Choose one of {', '.join(ANCHOR_CONDITIONS)}.")
    kinds = _CONDITION_KINDS[condition]
    ranges: list[tuple[int, int]] = []
    previous_selected = False
    for span in sorted(spans, key=lambda s: s.start):
        selected = span.kind in kinds
        if selected and previous_selected:
            ranges[-1] = (ranges[-1][0], span.end)
        elif selected:
            ranges.append((span.start, span.end))
        previous_selected = selected
    return ranges


def segment(benchmark: str, prompt: str) -> list[Span]:
    """Split a task prompt into sorted, non-overlapping typed spans covering every non-space character."""
    benchmark_spec(benchmark)
    try:
        tree = ast.parse(prompt)
    except SyntaxError as error:
        raise DatasetError(f"Cannot segment a {benchmark} prompt: it is not valid Python ({error}).") from None
    if benchmark == "mbpp":
        docstring = _docstring_node(tree)
        classify = _classify_mbpp_lines
    else:
        functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        docstring = _docstring_node(functions[-1]) if functions else None
        classify = _classify_humaneval_lines
    if docstring is None:
        raise DatasetError(
            f"Cannot segment a {benchmark} prompt: it has no docstring holding the task description "
            f"(prompt starts {prompt[:60]!r})."
        )
    start, end = _char_range(prompt, docstring)
    delimiter = prompt[start : start + 3]
    if delimiter not in ('"""', "'''") or not prompt[:end].endswith(delimiter):
        raise DatasetError(f"Cannot segment a {benchmark} prompt: its docstring is not a plain triple-quoted string.")
    content_start, content_end = start + 3, end - 3

    regions: list[tuple[int, int, SpanKind | None]] = [(0, content_start, "code")]
    lines = prompt[content_start:content_end].splitlines(keepends=True)
    offset = content_start
    for line, kind in zip(lines, classify([line.strip() for line in lines])):
        regions.append((offset, offset + len(line), kind))
        offset += len(line)
    regions.append((content_end, len(prompt), "code"))

    spans = _spans_from_regions(prompt, regions)
    if not any(span.kind == "nl" for span in spans):
        raise DatasetError(f"Segmenting a {benchmark} prompt found no natural-language description: {prompt!r}")
    return spans


def _docstring_node(node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef) -> ast.Constant | None:
    if node.body and isinstance(node.body[0], ast.Expr):
        value = node.body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value
    return None


def _char_range(prompt: str, node: ast.expr) -> tuple[int, int]:
    """Character offsets of ``node`` (``ast`` columns count UTF-8 bytes, prompts hold ``➞`` and the like)."""
    lines = prompt.splitlines(keepends=True)
    line_starts = [0]
    for line in lines:
        line_starts.append(line_starts[-1] + len(line))

    def offset(lineno: int, col_bytes: int) -> int:
        line = lines[lineno - 1]
        return line_starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8"))

    return offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)


def _spans_from_regions(prompt: str, regions: list[tuple[int, int, SpanKind | None]]) -> list[Span]:
    """Trim each region to its non-whitespace extent and merge same-kind neighbours."""
    spans: list[Span] = []
    for start, end, kind in regions:
        text = prompt[start:end]
        stripped = text.strip()
        if not stripped:
            continue
        assert kind is not None, f"non-blank region without a kind: {text!r}"
        first = start + len(text) - len(text.lstrip())
        last = first + len(stripped)
        if spans and spans[-1].kind == kind:
            spans[-1] = Span(spans[-1].start, last, kind)
        else:
            spans.append(Span(first, last, kind))
    return spans


def _classify_mbpp_lines(lines: list[str]) -> list[SpanKind | None]:
    """An MBPP docstring holds the task sentence and the assert line that tests it."""
    return [None if not line else "test" if line.startswith("assert") else "nl" for line in lines]


# "Example:", "Examples", "Example 1:", "For example:", "for examble:", "Example :", "[input/output] samples:"
_EXAMPLE_HEADER = re.compile(r"^((for\s+)?exam[pb]les?(\s*\d+)?\s*:?|\[input/output\] samples:?)$", re.IGNORECASE)
# Sections that describe the task again after an example block ("Note:", "Constraints:", "Variables:").
_SECTION_HEADER = re.compile(r"^(notes?|constraints?|constrain|variables|restrictions?)\s*:", re.IGNORECASE)
_EXPLANATION = re.compile(r"^explanation\b", re.IGNORECASE)
# A call at the start of a line, optionally after a bullet, "for" or "assert": ``* f(1) ==> 2``.
_CALL_LINE = re.compile(r"^([*-]\s+)?((for|assert)\s+)?(?P<call>[A-Za-z_][\w.]*\s*[(\[])")
# Lines of an example that are data, not prose: inputs/outputs, assignments, arrows, literals, comments.
_EXAMPLE_DATA = re.compile(
    r"""^(
        [A-Za-z_]\w*\s*[:=]          # arr = [...], grid : [...], Input: 3, Output: [2, 1]
        | (=>|->|==>|=|➞|\#)          # -> sort arr -> [...], => result = 9, # 1+2 is less ...
        | [][(){}'"\d]              # [1, 2], "abc", 30 = 2 * 3 * 5, ], 1) == [...]
        | -\d                        # -6
        | return\b | True\b | False\b | None\b
        | for\s+\w+\s*=              # For lst = [1,2,3] the output should be 6
    )""",
    re.IGNORECASE | re.VERBOSE,
)


def _classify_humaneval_lines(lines: list[str]) -> list[SpanKind | None]:
    """Kinds of the (stripped) lines of the completed function's docstring; ``None`` for blank lines.

    A line-by-line state machine: ``>>>`` lines and the output lines after them (up to a blank line)
    are tests; an example header opens an example block, whose data lines and explanations are tests
    until a section header (``Note:``) or a prose line ends it (a prose caption ending in ``:`` is
    ``nl`` but keeps the block open). Outside example blocks, a run of ``f(...) <op> result`` lines is
    a test when every call has literal arguments, and part of the description when one is symbolic
    (``fib4(n) -> fib4(n-1) + ...`` defines the task).
    """
    kinds: list[SpanKind | None] = []
    in_doctest = in_examples = in_explanation = False
    for line in lines:
        if not line:
            kinds.append(None)
            in_doctest = in_explanation = False
        elif line.startswith(">>>") or in_doctest:
            kinds.append("test")
            in_doctest = True
        elif _EXAMPLE_HEADER.match(line):
            kinds.append("test")
            in_examples = True
        elif _SECTION_HEADER.match(line):
            kinds.append("nl")
            in_examples = False
        elif in_examples:
            in_explanation = in_explanation or bool(_EXPLANATION.match(line))
            if in_explanation or _CALL_LINE.match(line) or _EXAMPLE_DATA.match(line):
                kinds.append("test")
            else:
                # A prose caption ending in ':' introduces the next example ("If the array is empty,
                # return an empty array:"); any other prose line is the description again.
                kinds.append("nl")
                in_examples = line.endswith(":")
        else:
            kinds.append("nl")
    return _mark_headerless_examples(lines, kinds)


def _mark_headerless_examples(lines: list[str], kinds: list[SpanKind | None]) -> list[SpanKind | None]:
    """Turn runs of call lines outside example blocks into tests when all their calls are literal."""
    kinds = list(kinds)
    runs: list[list[int]] = [[]]
    for index, (line, kind) in enumerate(zip(lines, kinds)):
        if not line:
            continue  # blank lines do not break a run
        if kind == "nl" and _literal_call(line) is not None:
            runs[-1].append(index)
        elif runs[-1]:
            runs.append([])
    for run in runs:
        if run and all(_literal_call(lines[index]) for index in run):
            for index in run:
                kinds[index] = "test"
    return kinds


def _literal_call(line: str) -> bool | None:
    """Whether the call opening ``line`` has only literal arguments; ``None`` if no call opens it."""
    match = _CALL_LINE.match(line)
    if match is None or not match.group("call").endswith("("):
        return None
    start = match.start("call")
    for close in (i for i, char in enumerate(line) if char == ")" and i > start):
        try:
            call = ast.parse(line[start : close + 1], mode="eval").body
        except SyntaxError:
            continue
        if not isinstance(call, ast.Call):
            return None
        try:
            for argument in [*call.args, *(keyword.value for keyword in call.keywords)]:
                ast.literal_eval(argument)
        except (ValueError, TypeError):  # literal_eval's "malformed node" errors
            return False
        return True
    return None
