"""The masked view of a prompt: the masking strategies, the mask token, and the masked ids themselves.

Four strategies:

* ``token`` (the paper, section 3.3 / eq. 18): the *embeddings* of anchored tokens are replaced by a
  mask token's embedding at the same positions, so the masked prompt has exactly as many tokens as
  the original and positions are unchanged;
* ``attention``: ids kept, the masked view cannot attend to anchored positions (at every step);
* ``replace`` (the authors' code): each anchored character span of the prompt *text* is replaced by
  one mask string and the whole text is tokenized again, so the masked prompt is usually shorter;
* ``delete``: the anchored text is removed, then the text is tokenized again.

:func:`masked_view` builds the masked view's ids for any of them from the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from spa.errors import ConfigError

MaskingVariant = Literal["token", "attention", "replace", "delete"]
MASKING_VARIANTS: tuple[str, ...] = ("token", "attention", "replace", "delete")
# The strategies that rewrite the prompt text: their masked prompt is tokenized again (another length).
TEXT_MASKING: tuple[str, ...] = ("replace", "delete")


def validate_masking(masking: str) -> MaskingVariant:
    if masking not in MASKING_VARIANTS:
        raise ConfigError(
            f"Unknown SPA masking variant {masking!r}. Use 'token' (the paper: anchored ids replaced by the "
            "mask token at the same positions), 'attention' (ids kept, the masked view cannot attend to "
            "anchored positions), 'replace' (each anchored text span replaced by one mask string, then the "
            "text tokenized again) or 'delete' (anchored text removed, then tokenized again)."
        )
    return masking  # type: ignore[return-value]


def resolve_mask_token_id(tokenizer, mask_token: str | int | None = "auto") -> int:
    """The id that replaces anchored tokens.

    ``mask_token`` is an id, a token string (a special token such as ``"<unk>"``, or text that encodes
    to exactly one token, such as ``" "``), or ``"auto"``/``None``: the tokenizer's mask, unk, then pad
    token, in that order (the authors used ``<unk>`` for CodeLlama, ``<pad>`` for DeepSeek-Coder and a
    space for CodeGen).
    """
    if isinstance(mask_token, int):
        if not 0 <= mask_token < len(tokenizer):
            raise ConfigError(
                f"Mask token id {mask_token} is outside the tokenizer's vocabulary (0..{len(tokenizer) - 1}). "
                "Set spa.mask_token to a valid id or a token string."
            )
        return mask_token
    if mask_token in (None, "auto"):
        for candidate in (tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id):
            if candidate is not None:
                return int(candidate)
        raise ConfigError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no mask, unk or pad token, so SPA "
            "cannot choose a mask token by itself. Set spa.mask_token explicitly, e.g. spa.mask_token=' ' "
            "(a space, as the authors did for CodeGen) or a token id."
        )
    if mask_token in tokenizer.all_special_tokens or mask_token in tokenizer.get_added_vocab():
        return int(tokenizer.convert_tokens_to_ids(mask_token))
    ids = tokenizer.encode(mask_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"Mask token {mask_token!r} encodes to {len(ids)} tokens ({ids}) with this tokenizer; SPA needs "
            "exactly one so that the masked prompt keeps every position. Choose a single-token string or an id, "
            "or use masking='replace', where the mask string may be any text."
        )
    return int(ids[0])


def masked_prompt_ids(prompt: Sequence[int], anchor_mask: Sequence[bool], mask_token_id: int) -> list[int]:
    """The prompt with every anchored id replaced by ``mask_token_id`` (same length, same positions)."""
    if len(prompt) != len(anchor_mask):
        raise ValueError(f"prompt has {len(prompt)} ids but its anchor mask has {len(anchor_mask)} entries")
    return [mask_token_id if anchored else token for token, anchored in zip(prompt, anchor_mask)]


def mask_string(tokenizer, mask_token: str | int | None = "auto") -> str:
    """The text that replaces each anchored span under ``masking="replace"``.

    A string is used as it is (any length; a special token's string such as ``"<unk>"`` tokenizes back
    to that token); an id or ``"auto"``/``None`` is resolved as by :func:`resolve_mask_token_id` and
    decoded, e.g. ``"<unk>"`` for CodeLlama.
    """
    if isinstance(mask_token, str) and mask_token != "auto":
        if not mask_token:
            raise ConfigError(
                "The mask string for masking='replace' is empty, which deletes the anchored text. Use "
                "masking='delete' for that, or give a non-empty spa.mask_token."
            )
        return mask_token
    return tokenizer.decode([resolve_mask_token_id(tokenizer, mask_token)])


def replace_spans(text: str, spans: Sequence[tuple[int, int]], replacement: str) -> str:
    """``text`` with each of the sorted, non-overlapping ``spans`` replaced by ``replacement``."""
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], replacement]
        cursor = end
    return "".join(pieces) + text[cursor:]


def masked_view(
    tokenizer,
    text: str,
    anchor_spans: Sequence[tuple[int, int]],
    strategy: str,
    *,
    mask_token: str | int | None = "auto",
    add_bos: bool | None = None,
) -> list[int]:
    """The masked view's token ids of ``text`` whose characters ``anchor_spans`` are anchored.

    ``token``: the prompt's ids with anchored ids replaced by the mask token's id; ``attention``: the
    prompt's ids themselves (the masking happens in attention, see :func:`spa.decode`); both have the
    prompt's length. ``replace`` / ``delete``: the ids of the rewritten text (each anchored span,
    touching spans merged, replaced by :func:`mask_string` or removed), any length. BOS follows
    ``add_bos`` exactly as for the original prompt (:func:`spa.text.tokenize_anchored`).
    """
    from spa.text import merge_spans, tokenize_anchored  # spa.text imports this module

    validate_masking(strategy)
    if strategy in TEXT_MASKING:
        replacement = mask_string(tokenizer, mask_token) if strategy == "replace" else ""
        return tokenize_anchored(tokenizer, replace_spans(text, merge_spans(anchor_spans), replacement), (), add_bos=add_bos).input_ids
    anchored = tokenize_anchored(tokenizer, text, anchor_spans, add_bos=add_bos)
    if strategy == "attention":
        return anchored.input_ids
    return masked_prompt_ids(anchored.input_ids, anchored.anchor_mask, resolve_mask_token_id(tokenizer, mask_token))
