"""The paper authors' protocol, re-implemented: their prompts, anchored text, masked view, stops and extraction.

Everything here reproduces what the authors' research code (``research/anchor_evaluation.py`` and
``research/weighted_utils/weighted_text_utils.py`` of github magic-YuanTian/Selective-Prompt-Anchoring, the
last version, b928139) did under transformers 4.38.1, whatever transformers version runs it here. It is
written from a reading of that code and checked against golden fixtures made by running their functions
(``tests/fixtures/authors/``); no code of theirs is in the project. Quirks are reproduced on purpose and
listed in ``docs/deviations.md`` with the number of tasks each one touches.

The rules, in words:

* **Anchored text.** HumanEval: in the last function of the prompt (from the last ``"\\ndef "``), the
  docstring text after the first ``\"\"\"`` up to the first line starting with ``>>>`` (condition ``nl``),
  or the whole docstring (``nl+test``, their ``--mask_test_case``), stripped; every occurrence of it in the
  last function is anchored. A docstring quoted with ``'''`` has no ``\"\"\"``: the search then starts two
  characters into the function and runs to its second-to-last character, so nearly the whole function is
  anchored. MBPP: every occurrence of the original task sentence (their ``prompt`` field) in the prompt (their
  ``info_prompt``); on tasks where MBPP+ edited the sentence it does not occur and nothing is anchored.
  MBPP has no test-only variant: ``nl+test`` is ``nl``. ``all`` (their ``--mask_entire_prompt``) is the whole
  task prompt (not the chat template around it).
* **Masked view** (``masking=replace``): each anchored occurrence becomes ONE mask string (DeepSeek-Coder
  ``<pad>``, CodeLlama ``<unk>``, CodeGen ``" "``) and the text is tokenized again, so the masked prompt is
  shorter than the original and later positions shift.
* **Prompt.** DeepSeek-Coder-Instruct: one user message rendered with the model's chat template (its default
  system prompt included, generation prompt added, no prefilled answer); on HumanEval the message is
  :data:`HUMANEVAL_INSTRUCTION` around the stripped prompt, on MBPP the raw prompt alone. Base models: the raw
  prompt, BOS as the tokenizer's encode added it under 4.38 (CodeLlama yes, CodeGen no).
* **Length.** ``max_length`` counts prompt + new tokens (500 in their last version, 750 in May 2024).
* **Stops.** Every step decodes the whole original sequence and appends what it adds to the text so far
  (so text that decoding changes retroactively is not revisited). EOS ends without adding text; a decoded BOS
  string ends too. DeepSeek: a complete, non-empty first ```python block. Base models: the text grows beyond
  the prompt by one more top-level (unindented) line than the prompt has, or two when the prompt has no
  ``def`` and the text has one (MBPP), or by 50 lines, or ends in 18 newlines; the token that triggered the
  stop is kept.
* **Extraction.** The body of the only ```python block, stripped; if there is not exactly one, the whole
  generated text. Base models on HumanEval: the raw prompt + that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from eval.errors import ConfigError, DatasetError

CharSpan = tuple[int, int]

FAMILIES: tuple[str, ...] = ("deepseek", "codellama", "codegen")
BASE_FAMILIES: tuple[str, ...] = ("codellama", "codegen")
CONDITIONS: tuple[str, ...] = ("none", "nl", "nl+test", "all")

# The user message the authors give DeepSeek-Coder-Instruct on HumanEval, around the stripped task prompt.
HUMANEVAL_INSTRUCTION = (
    "Please continue to complete the function. You are not allowed to modify the given code and do the "
    "completion only. Please return all completed function in a codeblock. Here is the given code to do "
    "completion:\n```python\n{code}\n```"
)

_LAST_FUNCTION = re.compile(r"\ndef\s")
_PYTHON_BLOCK = re.compile(r"```python(.*?)```", re.DOTALL)
# A decoded BOS ends generation (their other_stop_condition; it names DeepSeek-Coder's BOS).
_BOS_STOP = "<｜begin▁of▁sentence｜>"
_MAX_EXTRA_LINES = 50
_NEWLINE_RUN = "\n" * 18


def validate_family(family: str | None, model_name: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(
            f"protocol=authors needs the model's family (one of {', '.join(FAMILIES)}: it decides the mask string, "
            f"the prompt and the stop rule, as the authors' code decided by checkpoint name), but model "
            f"{model_name!r} has family={family!r}. Set `family:` in its config (configs/model/{model_name}.yaml), "
            "or use protocol=evalplus."
        )
    return family


def validate_condition(benchmark: str, condition: str) -> str:
    if condition not in CONDITIONS:
        raise ConfigError(
            f"Anchor condition {condition!r} does not exist in the authors' code. protocol=authors has "
            f"{', '.join(CONDITIONS)} (their default, --mask_test_case and --mask_entire_prompt); use "
            f"protocol=evalplus for {condition!r}."
        )
    return condition


# --------------------------------------------------------------------------------------------------
# Which characters are anchored


@dataclass(frozen=True)
class AnchoredText:
    """The anchored character spans of a task prompt, and which of the authors' quirks applied."""

    spans: tuple[CharSpan, ...]
    quirks: tuple[str, ...] = ()


def anchored_spans(benchmark: str, condition: str, prompt: str, task_sentence: str | None = None) -> AnchoredText:
    """The character spans of ``prompt`` the authors' code replaced under ``condition``."""
    validate_condition(benchmark, condition)
    if condition == "none":
        return AnchoredText(())
    if condition == "all":
        return AnchoredText(((0, len(prompt)),))
    if benchmark == "mbpp":
        if not task_sentence:
            raise DatasetError("An MBPP task of the authors' file has no task sentence (their 'prompt' field).")
        spans = _occurrences(prompt, task_sentence, 0)
        return AnchoredText(spans, () if spans else ("sentence-not-in-prompt",))
    return _humaneval_spans(prompt, include_tests=condition == "nl+test")


def _humaneval_spans(prompt: str, include_tests: bool) -> AnchoredText:
    starts = [match.start() for match in _LAST_FUNCTION.finditer(prompt)]
    if not starts:
        raise DatasetError(f"A HumanEval prompt has no '\\ndef ' (the authors' code fails on it): {prompt[:80]!r}")
    function_start = starts[-1]
    function = prompt[function_start:]
    quote = function.find('"""')
    quirks = () if quote >= 0 else ("no-triple-double-quote",)
    # Without '"""' both searches return -1: the text starts at index 2 and loses its last character.
    content = function[quote + 3 :]
    content = content[: content.find('"""')]
    lines = []
    for line in content.split("\n"):
        if not include_tests and line.strip().startswith(">>>"):
            break
        lines.append(line)
    anchored = "\n".join(lines).strip()
    if not anchored:
        # str.replace("", mask) would put a mask between every two characters; no prompt of theirs does this.
        raise DatasetError(f"The authors' NL rule finds no text in this HumanEval prompt: {prompt[:80]!r}")
    return AnchoredText(_occurrences(function, anchored, function_start), quirks)


def _occurrences(text: str, needle: str, offset: int) -> tuple[CharSpan, ...]:
    """Non-overlapping occurrences, left to right: what ``str.replace`` replaces."""
    return tuple((offset + m.start(), offset + m.end()) for m in re.finditer(re.escape(needle), text))


# --------------------------------------------------------------------------------------------------
# Rendering and tokenizing as the authors' code did under transformers 4.38


def user_message(benchmark: str, prompt: str) -> tuple[str, int, CharSpan]:
    """DeepSeek's user message for ``prompt``: (message, offset of prompt index 0 in it, the prompt's copied range).

    HumanEval's message holds ``prompt.strip()`` inside :data:`HUMANEVAL_INSTRUCTION`; MBPP's is the prompt.
    """
    if benchmark != "humaneval":
        return prompt, 0, (0, len(prompt))
    stripped = prompt.strip()
    lead = len(prompt) - len(prompt.lstrip())
    message = HUMANEVAL_INSTRUCTION.format(code=stripped)
    return message, message.index(stripped) - lead, (lead, lead + len(stripped))


def render(tokenizer, family: str, benchmark: str, prompt: str, spans: Sequence[CharSpan]) -> tuple[str, tuple[CharSpan, ...]]:
    """(the text the authors tokenized, the anchored spans moved into it)."""
    if family in BASE_FAMILIES:
        return prompt, tuple(spans)
    message, shift, (low, high) = user_message(benchmark, prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
    at = text.find(message)
    if at < 0 or text.count(message) != 1:
        raise ConfigError(
            f"The chat template of {getattr(tokenizer, 'name_or_path', '?')!r} does not copy the user message verbatim "
            "once, so the anchored text cannot be located; protocol=authors needs DeepSeek-Coder's template."
        )
    # Only the copied range of the prompt is in the text (strip() dropped the rest): clip the spans to it.
    moved = ((at + shift + max(low, s), at + shift + min(high, e)) for s, e in spans)
    return text, tuple((s, e) for s, e in moved if e > s)


def tokenize(tokenizer, family: str, text: str) -> tuple[list[int], list[CharSpan]]:
    """The ids (and character offsets) transformers 4.38.1 gave for ``text`` in the authors' code.

    DeepSeek: the chat-rendered text, encoded without special tokens (the template prints the BOS).
    Base models: ``tokenizer.encode(text)``. CodeLlama's 4.38 tokenizer (legacy SentencePiece
    normalisation) split the text at its special tokens (``<unk>``, ``<s>``, ``</s>``) and tokenized each
    piece as if it started a text, always prepending ``▁`` (a piece after ``<unk>`` gets its own, and one that
    starts with a space gets a second). transformers 5 tokenizes across special tokens and prepends ``▁`` only
    to text not starting with a space, so the pieces are encoded one by one here, with that space added back.
    CodeGen: no BOS.
    """
    if family != "codellama":
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    specials = sorted({tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token} - {None}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    ids, offsets, cursor = [tokenizer.bos_token_id], [(0, 0)], 0
    for match in [*pattern.finditer(text), None]:
        end = match.start() if match else len(text)
        if end > cursor:
            # 4.38 prepended "▁" to every piece; transformers 5 does so only when the piece does not
            # already start with a space, so such a piece gets one more space here.
            piece = text[cursor:end]
            extra = 1 if piece.startswith(" ") else 0
            encoding = tokenizer(" " * extra + piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += encoding["input_ids"]
            offsets += [(cursor + max(0, s - extra), cursor + max(0, e - extra)) for s, e in encoding["offset_mapping"]]
        if match:
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            offsets.append(match.span())
            cursor = match.end()
    return ids, offsets


def decode(tokenizer, family: str, ids: Sequence[int]) -> str:
    """``tokenizer.decode(ids)`` as 4.38 did it: special tokens kept; CodeGen cleaned up tokenization spaces.

    transformers 5 refuses that clean-up for byte-level BPE tokenizers (it corrupts code), so it is applied
    here with transformers' own ``clean_up_tokenization``.
    """
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return tokenizer.clean_up_tokenization(text) if family == "codegen" else text


# --------------------------------------------------------------------------------------------------
# Stops and extraction


def deepseek_block_complete(generated: str) -> bool:
    """The first ```python block is closed and not empty (an empty first block never completes)."""
    match = _PYTHON_BLOCK.search(generated)
    return bool(match) and match.group(1).strip() != ""


def _top_level(line: str) -> bool:
    return bool(line) and not line[0].isspace()


def base_function_complete(prompt_text: str, text: str) -> bool:
    """The authors' stop rule for completion models; ``text`` is ``prompt_text`` + the generated text."""
    if text.endswith(_NEWLINE_RUN):
        return True
    prompt_lines, lines = prompt_text.split("\n"), text.split("\n")
    if len(lines) > len(prompt_lines) + _MAX_EXTRA_LINES:
        return True
    prompt_defs = any(line.strip().startswith("def") for line in prompt_lines)
    text_defs = any(line.strip().startswith("def") for line in lines)
    extra = 2 if (not prompt_defs and text_defs) else 1
    return sum(map(_top_level, lines)) >= sum(map(_top_level, prompt_lines)) + extra


@dataclass
class Transcript:
    """One sequence's generated text as the authors' loop built it, fed one chosen token at a time."""

    tokenizer: object
    family: str
    prompt_ids: list[int]
    eos_token_id: int | None
    ids: list[int] = field(init=False)
    prompt_text: str = field(init=False)
    generated: str = ""
    finish_reason: str | None = None

    def __post_init__(self):
        self.ids = list(self.prompt_ids)
        self.prompt_text = decode(self.tokenizer, self.family, self.ids)
        self._previous = self.prompt_text

    def feed(self, token: int) -> bool:
        """Append a chosen token; True when generation stops here."""
        if self.finish_reason is not None:
            raise RuntimeError("token fed to a finished transcript")
        self.ids.append(int(token))
        if token == self.eos_token_id:
            self.finish_reason = "eos"
            return True
        current = decode(self.tokenizer, self.family, self.ids)
        new = current[len(self._previous) :]
        if new == _BOS_STOP:
            self.finish_reason = "bos"
            return True
        self.generated += new
        if self.family in BASE_FAMILIES:
            done = base_function_complete(self.prompt_text, self.prompt_text + self.generated)
        else:
            done = deepseek_block_complete(self.generated)
        if done:
            self.finish_reason = "stop"
            return True
        self._previous = current
        return False


def replay(tokenizer, family: str, prompt_ids: Sequence[int], generated_ids: Sequence[int], eos_token_id: int | None,
           budget: int) -> Transcript:
    """The transcript of ``generated_ids`` (the tokens a decode chose); ``budget`` ends it as their loop did."""
    transcript = Transcript(tokenizer, family, list(prompt_ids), eos_token_id)
    for token in generated_ids:
        if transcript.feed(token):
            break
    if transcript.finish_reason is None:
        transcript.finish_reason = "length" if len(transcript.ids) - len(prompt_ids) >= budget else "unfinished"
    return transcript


def extract_solution(family: str, benchmark: str, raw_prompt: str, generated: str) -> str:
    """The program the authors saved for a generation."""
    blocks = _PYTHON_BLOCK.findall(generated)
    code = blocks[0].strip() if len(blocks) == 1 else generated
    if benchmark == "humaneval" and family in BASE_FAMILIES:
        code = raw_prompt + code
    return code
