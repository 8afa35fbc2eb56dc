"""Text-level SPA: prompts with anchors -> token ids with an anchor mask -> generated text.

Anchors come in the four input formats of the authors' ``anchoring`` package:

1. a string prompt and character spans ``[(start, end), ...]``;
2. a string prompt and substrings ``["text to anchor", ...]`` (every occurrence is anchored);
3. a string prompt with inline tags: ``"... <anchor>text to anchor</anchor> ..."``;
4. chat messages ``[{"role": ..., "content": ..., "anchors": [...]}, ...]`` rendered with the
   tokenizer's chat template; a message's anchors are substrings or spans of its content, or inline tags.

Unlike the package, anchors are never found by string replacement (which changes the token count):
the prompt is tokenized once, and a token is anchored iff its character offsets overlap an anchored
character span. BOS is handled explicitly (see :func:`resolve_add_bos`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from transformers import StopStringCriteria

from spa.errors import ConfigError
from spa.engine import decode
from spa.masking import TEXT_MASKING, masked_view, resolve_mask_token_id, validate_masking

CharSpan = tuple[int, int]
Anchors = Union[Sequence[CharSpan], Sequence[str], None]
Message = dict
PromptInput = Union[str, Sequence[Message]]

_TAG = re.compile(r"<anchor>(.*?)</anchor>", flags=re.DOTALL)


@dataclass(frozen=True)
class AnchoredPrompt:
    """A prompt ready for :func:`spa.decode`: its text, anchored character spans, ids and anchor mask."""

    text: str
    anchor_spans: tuple[CharSpan, ...]
    input_ids: list[int]
    anchor_mask: list[bool]
    offsets: list[CharSpan]

    @property
    def anchored_text(self) -> list[str]:
        return [self.text[start:end] for start, end in self.anchor_spans]


def merge_spans(spans: Sequence[CharSpan]) -> tuple[CharSpan, ...]:
    """Sorted, non-empty, non-overlapping spans (overlapping or touching spans are merged)."""
    merged: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


def _strip_tags(text: str) -> tuple[str, list[CharSpan]]:
    """Remove ``<anchor>`` tags, returning the clean text and the tagged spans inside it."""
    pieces, spans, cursor, clean_length = [], [], 0, 0
    for match in _TAG.finditer(text):
        pieces.append(text[cursor : match.start()])
        clean_length += match.start() - cursor
        spans.append((clean_length, clean_length + len(match.group(1))))
        pieces.append(match.group(1))
        clean_length += len(match.group(1))
        cursor = match.end()
    pieces.append(text[cursor:])
    clean = "".join(pieces)
    if "<anchor>" in clean or "</anchor>" in clean:
        raise ConfigError(
            "Unbalanced or nested <anchor> tags in prompt: every <anchor> needs a matching </anchor> and tags "
            f"cannot nest. Offending text near: {clean[max(0, clean.find('anchor>') - 30):][:80]!r}"
        )
    return clean, spans


def _resolve_anchors(text: str, anchors: Anchors) -> tuple[str, list[CharSpan]]:
    """Clean text (tags removed) and the anchored character spans in it, for one string."""
    clean, spans = _strip_tags(text)
    for anchor in anchors or ():
        if isinstance(anchor, str):
            if not anchor.strip():
                continue
            found = [(m.start(), m.start() + len(anchor)) for m in re.finditer(re.escape(anchor), clean)]
            if not found:
                raise ConfigError(
                    f"Anchor substring {anchor[:60]!r} does not occur in the prompt. Anchors must be exact "
                    "substrings of the prompt text (after removing <anchor> tags)."
                )
            spans.extend(found)
        else:
            start, end = anchor
            if not 0 <= start <= end <= len(clean):
                raise ConfigError(
                    f"Anchor span {(start, end)} lies outside the prompt (length {len(clean)}). Spans are "
                    "half-open character offsets into the prompt text."
                )
            spans.append((start, end))
    return clean, spans


def render(tokenizer, prompt: PromptInput, anchors: Anchors = None, *, add_generation_prompt: bool = True) -> tuple[str, tuple[CharSpan, ...]]:
    """The prompt as the model sees it (chat template applied to messages) and its anchored spans.

    ``anchors`` are global: for messages they apply to every message's content, in addition to the
    message's own ``"anchors"`` and inline tags.
    """
    if isinstance(prompt, str):
        text, spans = _resolve_anchors(prompt, anchors)
        return text, merge_spans(spans)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Chat messages were given but tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat "
            "template. Pass a plain string prompt for base models, or a tokenizer that has a chat template."
        )
    cleaned, message_spans = [], []
    for message in prompt:
        own = list(message.get("anchors", ()))
        content, spans = _resolve_anchors(message.get("content", ""), [*(anchors or ()), *own])
        cleaned.append({k: v for k, v in message.items() if k != "anchors"} | {"content": content})
        message_spans.append(spans)
    text = tokenizer.apply_chat_template(cleaned, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Relocate each message's spans: its content appears verbatim, in order, in the rendered text.
    spans, cursor = [], 0
    for message, local in zip(cleaned, message_spans):
        start = text.find(message["content"], cursor)
        if start < 0:
            if local:
                raise ConfigError(
                    "The chat template changed a message's content (e.g. stripped it), so its anchors cannot "
                    f"be located in the rendered prompt. Message starts with {message['content'][:60]!r}; "
                    "remove leading/trailing whitespace from the content or anchor a substring instead."
                )
            continue
        spans.extend((start + s, start + e) for s, e in local)
        cursor = start + len(message["content"])
    return text, merge_spans(spans)


def _tokenizer_config_value(tokenizer, key: str):
    """A value from the tokenizer's own tokenizer_config.json (transformers 5 drops some, e.g. add_bos_token)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(tokenizer.name_or_path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # no file, or no network for a hub id: fall back to the tokenizer's behaviour
        return None
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(key)


def resolve_add_bos(tokenizer, add_bos: bool | None = None) -> bool:
    """Whether the model expects a BOS token in front of the prompt.

    Explicit ``add_bos`` wins. Otherwise the tokenizer_config.json's ``add_bos_token`` decides, as it
    did under transformers 4.x: DeepSeek-Coder's tokenizer says ``true`` but transformers 5.x loads it as
    a byte-level backend that no longer adds BOS, while the model was trained with it. Failing that,
    whatever the tokenizer's own encode does, except that a chat template printing BOS means the model
    expects it (with a warning: a tokenizer re-saved by transformers 5 has lost ``add_bos_token``).
    """
    if add_bos is not None:
        return bool(add_bos)
    if tokenizer.bos_token_id is None:
        return False
    configured = _tokenizer_config_value(tokenizer, "add_bos_token")
    if configured is not None:
        return bool(configured)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bool(probe) and probe[0] == tokenizer.bos_token_id:
        return True
    if "bos_token" in (getattr(tokenizer, "chat_template", None) or ""):
        # A DeepSeek-Coder tokenizer re-saved by transformers 5 (save_pretrained drops add_bos_token) no
        # longer says that its model expects BOS; its chat template, which prints BOS, still does.
        warnings.warn(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no add_bos_token in its tokenizer_config.json "
            "(transformers 5's save_pretrained drops it) and its encode adds no BOS, but its chat template prints "
            "the BOS token, so the model expects one: adding BOS. Pass add_bos=True or add_bos=False to decide "
            "explicitly and silence this warning.",
            stacklevel=2,
        )
        return True
    return False


def tokenize_anchored(tokenizer, text: str, anchor_spans: Sequence[CharSpan], *, add_bos: bool | None = None) -> AnchoredPrompt:
    """Tokenize ``text`` once and mark every token whose offsets overlap an anchored span."""
    spans = merge_spans(anchor_spans)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    if resolve_add_bos(tokenizer, add_bos) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    # Zero-width tokens (BOS, other specials) never overlap a span.
    return AnchoredPrompt(text=text, anchor_spans=spans, input_ids=ids, anchor_mask=anchor_mask_of(offsets, spans), offsets=offsets)


def anchor_mask_of(offsets: Sequence[CharSpan], anchor_spans: Sequence[CharSpan]) -> list[bool]:
    """True for each token whose character offsets overlap an anchored span (zero-width tokens never do)."""
    return [any(s < span_end and span_start < e for span_start, span_end in anchor_spans) for s, e in offsets]


def anchor_prompt(
    tokenizer, prompt: PromptInput, anchors: Anchors = None, *, add_bos: bool | None = None, add_generation_prompt: bool = True
) -> AnchoredPrompt:
    """Any of the four anchor formats -> :class:`AnchoredPrompt`."""
    text, spans = render(tokenizer, prompt, anchors, add_generation_prompt=add_generation_prompt)
    return tokenize_anchored(tokenizer, text, spans, add_bos=add_bos)


def _check_batch(prompts, anchors) -> None:
    """Refuse the shapes that would silently mean something else: one prompt instead of a list of them,
    one anchor list instead of one per prompt (a string is a sequence, so each character would count)."""
    if isinstance(prompts, str):
        single = "a single string"
    elif isinstance(prompts, AnchoredPrompt):
        single = "a single AnchoredPrompt"
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, dict) for p in prompts):
        single = "one chat conversation (a list of messages)"
    else:
        single = None
    if single:
        raise ConfigError(
            f"prompts is {single}, but it must be a list of prompts (a bare string would be decoded as one "
            "prompt per character). Wrap it: prompts=[prompt], and give anchors one anchor list per prompt, "
            "e.g. anchors=[['text to anchor']]."
        )
    if anchors is None:
        return
    if isinstance(anchors, str) or any(isinstance(entry, (str, int)) or _is_span(entry) for entry in anchors):
        raise ConfigError(
            f"anchors={anchors!r} looks like the anchors of one prompt, but anchors must hold one anchor list "
            "per prompt (a string entry would anchor each of its characters). Wrap it: for one prompt, "
            "anchors=[['text to anchor']] or anchors=[[(start, end)]]; for several, one list (or None) per prompt."
        )
    if len(anchors) != len(prompts):
        raise ConfigError(
            f"anchors holds {len(anchors)} entries for {len(prompts)} prompts: give one anchor list (or None) per "
            "prompt, in the same order."
        )


def _is_span(entry) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, int) for x in entry)


def anchor_prompts(
    tokenizer, prompts: Sequence[PromptInput | AnchoredPrompt], anchors: Sequence[Anchors] | None = None, *, add_bos: bool | None = None
) -> list[AnchoredPrompt]:
    """:func:`anchor_prompt` for each prompt (``anchors``: one entry per prompt); anchored ones pass through."""
    _check_batch(prompts, anchors)
    return [
        p if isinstance(p, AnchoredPrompt) else anchor_prompt(tokenizer, p, a, add_bos=add_bos)
        for p, a in zip(prompts, anchors if anchors is not None else [None] * len(prompts))
    ]


def masked_view_arguments(
    tokenizer,
    anchored: Sequence[AnchoredPrompt],
    *,
    masking: str,
    mask_token: str | int | None = "auto",
    add_bos: bool | None = None,
    masked_prompts: Sequence[Sequence[int]] | None = None,
) -> dict:
    """The :func:`spa.decode` arguments that give the masked view of ``anchored`` prompts.

    ``token`` / ``attention``: the anchor masks (and the mask token's id); ``replace`` / ``delete``: the
    masked prompts, each rewritten text tokenized again (:func:`spa.masking.masked_view`); explicit
    ``masked_prompts`` are passed through (decode refuses them with another ``masking``).
    """
    if masked_prompts is not None:
        return {"masked_prompts": masked_prompts, "masking": masking}
    if validate_masking(masking) in TEXT_MASKING:
        return {"masked_prompts": [masked_view(tokenizer, a.text, a.anchor_spans, masking, mask_token=mask_token, add_bos=add_bos) for a in anchored]}
    return {"anchor_masks": [a.anchor_mask for a in anchored], "mask_token_id": resolve_mask_token_id(tokenizer, mask_token), "masking": masking}


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest stop string, as EvalPlus truncates completions."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def generate(
    model,
    tokenizer,
    prompts: Sequence[PromptInput | AnchoredPrompt],
    anchors: Sequence[Anchors] | None = None,
    *,
    omega: float,
    max_new_tokens: int | Sequence[int],
    mask_token: str | int | None = "auto",
    stop_strings: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    add_bos: bool | None = None,
    batch_size: int | None = None,
    masking: str = "token",
    modulated_by_prob: bool = False,
    progress: bool = False,
    **sampling,
) -> list[str]:
    """Generate text for each prompt with SPA; returns the new text of each sequence.

    ``prompts`` is a list of prompts and ``anchors`` holds one anchor list (spans or substrings) per
    prompt; inline tags and per-message anchors need none. Prompts already anchored
    (:class:`AnchoredPrompt`) are used as they are. ``masking`` is any strategy of :mod:`spa.masking`:
    ``"replace"`` and ``"delete"`` rewrite the prompt text and tokenize it again (a masked prompt of
    another length). ``max_new_tokens`` is one int or one per prompt. Decoding stops at the tokenizer's
    EOS (unless ``eos_token_id`` is given) or at a stop string, which is cut off.
    """
    anchored = anchor_prompts(tokenizer, prompts, anchors, add_bos=add_bos)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    criteria = [StopStringCriteria(tokenizer, list(stop_strings))] if stop_strings else []
    ids = decode(
        model,
        [a.input_ids for a in anchored],
        omega=omega,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        batch_size=batch_size,
        modulated_by_prob=modulated_by_prob,
        stopping_criteria=criteria,
        progress=progress,
        **masked_view_arguments(tokenizer, anchored, masking=masking, mask_token=mask_token, add_bos=add_bos),
        **sampling,
    )
    return [truncate_at_stop(tokenizer.decode(seq, skip_special_tokens=True), stop_strings) for seq in ids]
