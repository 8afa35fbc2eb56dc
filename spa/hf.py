"""SPA inside ``model.generate``: a ``transformers.LogitsProcessor`` for left-padded batches.

This is the interop path (two forwards per step, like transformers' classifier-free guidance); the
fast path is :func:`spa.decode`, which runs both views in one forward. Unlike the authors' processor,
the masked view here is left-padded on its own with correct position ids (so it may have any length),
follows ``num_return_sequences``, and starts from a fresh state whenever a new ``generate`` call begins,
so nothing leaks between calls.

    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, prompts, anchors, omega=1.3)
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, prompts, anchors, omega=1.3, masking="replace")
    out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=256, do_sample=False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

from spa.engine import combine_logits, model_device, resolve_masked_views
from spa.masking import validate_masking
from spa.text import AnchoredPrompt, Anchors, PromptInput, anchor_prompts, masked_view_arguments
from spa.views import build_views, count_positions, left_pad


class SPALogitsProcessor(LogitsProcessor):
    """Replaces the scores of each step by ``omega * original + (1 - omega) * masked``.

    The original view is ``generate``'s own; the processor runs the masked view, left-padded on its own
    with its own position ids, so it may have any length. Two ways to give its padding:

        SPALogitsProcessor(model, masked_input_ids=..., masked_attention_mask=..., omega=1.3)   # any length
        SPALogitsProcessor(model, masked_input_ids, attention_mask, omega)   # padded exactly like input_ids

    Args:
        model: the model ``generate`` runs (its forward computes the masked view).
        masked_input_ids: (batch, masked length) the masked prompts, left-padded.
        attention_mask: (batch, length) the padding mask of ``generate``'s inputs (1 = real token), when
            ``masked_input_ids`` are padded exactly like them (same length: ``masking="token"`` or
            ``"attention"``).
        omega: anchoring strength.
        masked_attention_mask: instead of ``attention_mask``: the padding mask of ``masked_input_ids``.
        input_ids: optionally, the left-padded prompts ``generate`` will get; every new ``generate``
            call is then checked against them (``num_return_sequences`` copies allowed).
        anchor_mask: (batch, masked length) anchored positions; needed for ``masking="attention"`` only.
        masking: ``"token"`` (ids already masked in ``masked_input_ids``, whatever the strategy) or
            ``"attention"`` (``masked_input_ids`` are the prompts; anchored positions are hidden).
        modulated_by_prob: the authors' probability-modulated weighting, per row.
    """

    def __init__(
        self,
        model,
        masked_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        omega: float | None = None,
        *,
        masked_attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        anchor_mask: torch.Tensor | None = None,
        masking: str = "token",
        modulated_by_prob: bool = False,
    ):
        if omega is None:
            raise TypeError("SPALogitsProcessor needs omega")
        if (attention_mask is None) == (masked_attention_mask is None):
            raise ValueError(
                "SPALogitsProcessor needs the padding of masked_input_ids exactly one way: "
                "masked_attention_mask=... (the masked prompts' own padding mask, any length), or "
                "attention_mask=... (generate's padding mask, when the masked prompts are padded exactly like "
                "its input_ids)."
            )
        if validate_masking(masking) not in ("token", "attention"):
            raise ValueError(
                f"SPALogitsProcessor takes masked ids as they are; masking={masking!r} is built by "
                "SPALogitsProcessor.prepare(..., masking=...) or spa.masked_view. Use masking='token' here."
            )
        if masking == "attention" and anchor_mask is None:
            raise ValueError("masking='attention' needs anchor_mask")
        self.model = model
        self.omega = float(omega)
        self.modulated_by_prob = modulated_by_prob
        device = model_device(model)
        padding = (masked_attention_mask if masked_attention_mask is not None else attention_mask).to(device).bool()
        if padding.shape != masked_input_ids.shape:
            raise ValueError(
                f"the padding mask has shape {tuple(padding.shape)} but masked_input_ids {tuple(masked_input_ids.shape)}"
            )
        self.masked_input_ids = masked_input_ids.to(device)
        self.positions = count_positions(padding)
        keep = padding if masking == "token" else padding & ~anchor_mask.to(device).bool()
        self.masked_attention = keep.long()
        self.input_ids = input_ids
        # generate's prompt width, where known: its inputs must have it.
        self.input_width = input_ids.shape[1] if input_ids is not None else attention_mask.shape[1] if attention_mask is not None else None
        self._reset()

    def _reset(self) -> None:
        self._cache: DynamicCache | None = None
        self._attention: torch.Tensor | None = None
        self._next_position: torch.Tensor | None = None
        self._expected_length = -1
        self._prompt: torch.Tensor | None = None

    def _is_continuation(self, input_ids: torch.LongTensor) -> bool:
        return (
            self._cache is not None
            and input_ids.shape[1] == self._expected_length
            and input_ids.shape[0] == self._prompt.shape[0]
            and torch.equal(input_ids[:, : self._prompt.shape[1]], self._prompt)
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.omega == 1.0:
            return scores
        if self._is_continuation(input_ids):
            self._attention = torch.cat([self._attention, self._attention.new_ones(self._attention.shape[0], 1)], dim=-1)
            outputs = self.model(
                input_ids=input_ids[:, -1:].to(self.masked_input_ids.device),
                attention_mask=self._attention,
                position_ids=self._next_position,
                past_key_values=self._cache,
                use_cache=True,
            )
            self._next_position = self._next_position + 1
        else:
            outputs = self._prefill(input_ids)
        self._expected_length = input_ids.shape[1] + 1
        masked_logits = outputs.logits[:, -1, :].to(scores.device)
        return combine_logits(scores, masked_logits, self.omega, self.modulated_by_prob)

    def _prefill(self, input_ids: torch.LongTensor):
        """A new generate call: run the masked prompts, expanded like generate expanded its inputs."""
        self._reset()
        batch = self.masked_input_ids.shape[0]
        repeats, remainder = divmod(input_ids.shape[0], batch)
        matches = remainder == 0 and (self.input_width is None or input_ids.shape[1] == self.input_width)
        if matches and self.input_ids is not None:
            matches = torch.equal(input_ids, self.input_ids.to(input_ids.device).repeat_interleave(repeats, dim=0))
        if not matches:
            raise ValueError(
                f"generate's inputs have shape {tuple(input_ids.shape)} but the processor was built for "
                f"{batch} prompts{f' of padded length {self.input_width}' if self.input_width else ''}. Build "
                "the processor from the same prompts (SPALogitsProcessor.prepare) for every generate call; "
                "beam search is not supported."
            )
        self._prompt = input_ids.clone()
        self._attention = self.masked_attention.repeat_interleave(repeats, dim=0)
        positions = self.positions.repeat_interleave(repeats, dim=0)
        self._next_position = positions[:, -1:] + 1
        self._cache = DynamicCache(config=self.model.config)
        return self.model(
            input_ids=self.masked_input_ids.repeat_interleave(repeats, dim=0),
            attention_mask=self._attention,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )

    @classmethod
    def prepare(
        cls,
        model,
        tokenizer,
        prompts: Sequence[PromptInput | AnchoredPrompt],
        anchors: Sequence[Anchors] | None = None,
        *,
        omega: float,
        masked_prompts: Sequence[Sequence[int]] | None = None,
        mask_token: str | int | None = "auto",
        masking: str = "token",
        modulated_by_prob: bool = False,
        add_bos: bool | None = None,
    ) -> tuple[dict[str, torch.Tensor], "SPALogitsProcessor"]:
        """Left-padded ``generate`` inputs for ``prompts`` and the matching processor.

        The masked view is built from the anchors by ``masking`` (``"token"``, ``"attention"``, or the
        text-level ``"replace"`` / ``"delete"``, see :func:`spa.masking.masked_view`), or given as
        ``masked_prompts``: token-id lists of any length, one per prompt, used as they are.
        """
        anchored = anchor_prompts(tokenizer, prompts, anchors, add_bos=add_bos)
        ids = [a.input_ids for a in anchored]
        given = masked_view_arguments(tokenizer, anchored, masking=masking, mask_token=mask_token, add_bos=add_bos,
                                      masked_prompts=masked_prompts)
        masked, _ = resolve_masked_views(ids, omega=omega, **given)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        device = model_device(model)
        inputs = build_views(ids, views=("original",), pad_id=pad_id, device=device)
        # Padding only: under masking="attention" the processor hides the anchored positions itself.
        masked_rows = build_views(ids, masked, views=("masked",), pad_id=pad_id, device=device)
        anchor_mask = None
        if masking == "attention":  # the masked ids are the prompts, padded alike
            anchor_mask = left_pad([a.anchor_mask for a in anchored], inputs.input_ids.shape[1], False, device)
        processor = cls(
            model,
            masked_rows.input_ids,
            masked_attention_mask=masked_rows.attention_mask,
            omega=omega,
            input_ids=inputs.input_ids,
            anchor_mask=anchor_mask,
            masking="attention" if masking == "attention" else "token",
            modulated_by_prob=modulated_by_prob,
        )
        return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}, processor
