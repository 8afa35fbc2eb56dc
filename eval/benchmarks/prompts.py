"""Prompt builders: the text a model is given for a task, and where the anchored characters lie in it.

Two styles, both as EvalPlus 0.3.1 builds them (``evalplus/codegen.py``, ``provider/hf.py``):

* ``base`` (CodeGen-Mono, CodeLlama): direct completion of ``task["prompt"].strip() + "\\n"``, stopped
  by EvalPlus's ``EOS`` plus ``extra_eos_for_direct_completion(dataset)``.
* ``instruct`` (DeepSeek-Coder-Instruct): EvalPlus's ``make_raw_chat_prompt``: the tokenizer's own chat
  template renders a user turn (instruction prefix, then the stripped task prompt in a ``` block) and
  the assistant turn is prefilled with the response prefix and an opening ```python fence. Stopped by
  ``EOS`` plus the closing fence ``"\\n```\\n"``.

The anchor spans are the task's typed spans (``eval.benchmarks.spans``) moved to where the task prompt sits in
the rendered text; the system prompt and EvalPlus's prefixes are never anchored. Chat templates may
print the BOS token as text (DeepSeek-Coder does): encode ``text`` with ``add_special_tokens=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from evalplus.provider.utility import EOS, extra_eos_for_direct_completion, make_raw_chat_prompt

from eval.errors import ConfigError
from eval.benchmarks.spans import Span, anchor_char_spans, segment, validate_condition

PromptStyle = Literal["base", "instruct"]
PROMPT_STYLES: tuple[str, ...] = ("base", "instruct")

# EvalPlus keeps these as locals of ``evalplus.codegen.run_codegen`` (default, non-EvalPerf run);
# tests/test_prompts.py checks that they are still the strings in that function's source.
INSTRUCTION_PREFIX = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
RESPONSE_PREFIX = (
    "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
)
# What the instruct prompt ends with: the assistant turn up to the opening fence.
INSTRUCT_PREFILL = f"{RESPONSE_PREFIX}\n```python\n"
CLOSING_FENCE_STOP = "\n```\n"


@dataclass(frozen=True)
class BuiltPrompt:
    """A rendered prompt and its anchors.

    ``anchor_spans`` and ``spans`` are character ranges of ``text``; ``text[task_prompt_offset:]``
    starts with the stripped task prompt. ``prefill`` is the tail of ``text`` that stands for the start
    of the model's answer ("" for base models); the generation continues right after it.
    """

    text: str
    anchor_spans: list[tuple[int, int]]
    stop_strings: list[str]
    style: PromptStyle
    benchmark: str
    condition: str
    spans: list[Span]
    task_prompt_offset: int
    prefill: str


def stop_strings(benchmark: str, style: PromptStyle) -> list[str]:
    """The strings EvalPlus stops generation at, for this benchmark and prompt style."""
    if style == "base":
        return [*EOS, *extra_eos_for_direct_completion(benchmark)]
    return [*EOS, CLOSING_FENCE_STOP]


def build_prompt(
    task: dict, benchmark: str, style: PromptStyle, condition: str, tokenizer=None
) -> BuiltPrompt:
    """Render ``task`` for a model of ``style`` and locate the characters anchored under ``condition``.

    ``tokenizer`` is required for ``instruct`` (its chat template renders the prompt) and unused for
    ``base`` (which is EvalPlus's ``--force-base-prompt`` when given a chat model).
    """
    validate_condition(benchmark, condition)
    if style not in PROMPT_STYLES:
        raise ConfigError(
            f"Unknown prompt style {style!r}. Use 'base' for completion models (CodeGen-Mono, CodeLlama) "
            "or 'instruct' for chat models rendered with their own chat template (DeepSeek-Coder-Instruct)."
        )
    prompt = task["prompt"]
    task_spans = segment(benchmark, prompt)
    stripped = prompt.strip()
    # EvalPlus's codegen passes every model task["prompt"].strip() + "\n".
    completion_prompt = stripped + "\n"
    if style == "base":
        text, task_prompt_offset, prefill = completion_prompt, 0, ""
    else:
        text = _render_chat(completion_prompt, tokenizer)
        task_prompt_offset, prefill = _locate_task_prompt(text, stripped, tokenizer), INSTRUCT_PREFILL

    shift = task_prompt_offset - (len(prompt) - len(prompt.lstrip()))
    spans = [Span(span.start + shift, span.end + shift, span.kind) for span in task_spans]
    for original, moved in zip(task_spans, spans):
        assert text[moved.start : moved.end] == original.text(prompt), (original, moved)
    return BuiltPrompt(
        text=text,
        anchor_spans=anchor_char_spans(spans, condition),
        stop_strings=stop_strings(benchmark, style),
        style=style,
        benchmark=benchmark,
        condition=condition,
        spans=spans,
        task_prompt_offset=task_prompt_offset,
        prefill=prefill,
    )


def _render_chat(completion_prompt: str, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        has_none = "none was given" if tokenizer is None else f"{_name(tokenizer)!r} has none"
        raise ConfigError(
            f"The 'instruct' prompt style needs a tokenizer with a chat template, and {has_none}. "
            "Use style 'base' for completion models (CodeGen-Mono, CodeLlama), or load the chat model's own "
            "tokenizer (e.g. deepseek-coder-instruct); the harness never substitutes a generic template."
        )
    text = make_raw_chat_prompt(completion_prompt, INSTRUCTION_PREFIX, RESPONSE_PREFIX, tokenizer)
    if not text.endswith(INSTRUCT_PREFILL):
        raise ConfigError(
            f"The chat template of {_name(tokenizer)!r} does not end the rendered prompt with the assistant turn "
            f"prefilled by EvalPlus ({INSTRUCT_PREFILL!r}); the instruct style cannot be used with it."
        )
    return text


def _locate_task_prompt(text: str, stripped_prompt: str, tokenizer) -> int:
    """Where the task prompt sits in the rendered chat text; it must appear there verbatim, once."""
    count = text.count(stripped_prompt)
    if count != 1:
        raise ConfigError(
            f"The chat template of {_name(tokenizer)!r} renders the task prompt {count} times verbatim "
            "(expected once), so the anchored characters cannot be located in it. Use a template that "
            "copies the user message unchanged."
        )
    return text.index(stripped_prompt)


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
