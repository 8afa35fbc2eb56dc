"""The masked view of a prompt: which id replaces anchored tokens, and the masked ids themselves.

The paper (eq. 18) replaces the *embeddings* of anchored tokens by a mask token's embedding at the same
positions, so the masked prompt has exactly as many tokens as the original and positions are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from eval.errors import ConfigError

MaskingVariant = Literal["token", "attention"]
MASKING_VARIANTS: tuple[str, ...] = ("token", "attention")


def validate_masking(masking: str) -> MaskingVariant:
    if masking not in MASKING_VARIANTS:
        raise ConfigError(
            f"Unknown SPA masking variant {masking!r}. Use 'token' (the paper: anchored ids replaced by the "
            "mask token at the same positions) or 'attention' (ids kept, the masked view cannot attend to "
            "anchored positions)."
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
            "exactly one so that the masked prompt keeps every position. Choose a single-token string or an id."
        )
    return int(ids[0])


def masked_prompt_ids(prompt: Sequence[int], anchor_mask: Sequence[bool], mask_token_id: int) -> list[int]:
    """The prompt with every anchored id replaced by ``mask_token_id`` (same length, same positions)."""
    if len(prompt) != len(anchor_mask):
        raise ValueError(f"prompt has {len(prompt)} ids but its anchor mask has {len(anchor_mask)} entries")
    return [mask_token_id if anchored else token for token, anchored in zip(prompt, anchor_mask)]
