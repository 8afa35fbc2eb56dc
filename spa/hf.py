"""SPA inside ``model.generate``: a ``transformers.LogitsProcessor`` for left-padded batches.

This is the interop path (two forwards per step, like transformers' classifier-free guidance); the
fast path is :func:`spa.decode`, which runs both views in one forward. Unlike the authors' processor,
the masked view here is left-padded with correct position ids, follows ``num_return_sequences``, and
starts from a fresh state whenever a new ``generate`` call begins, so nothing leaks between calls.

    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, prompts, anchors, omega=1.3)
    out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=256, do_sample=False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

from spa.engine import combine_logits, model_device
from spa.masking import masked_prompt_ids, resolve_mask_token_id, validate_masking
from spa.text import AnchoredPrompt, Anchors, PromptInput, anchor_prompts


class SPALogitsProcessor(LogitsProcessor):
    """Replaces the scores of each step by ``omega * original + (1 - omega) * masked``.

    Args:
        model: the model ``generate`` runs (its forward computes the masked view).
        masked_input_ids: (batch, length) masked prompts, left-padded exactly like the ``input_ids``
            given to ``generate``.
        attention_mask: (batch, length) padding mask of those inputs (1 = real token).
        omega: anchoring strength.
        anchor_mask: (batch, length) anchored positions; needed for ``masking="attention"`` only.
        masking: ``"token"`` (ids already replaced in ``masked_input_ids``) or ``"attention"``.
        modulated_by_prob: the authors' probability-modulated weighting, per row.
    """

    def __init__(
        self,
        model,
        masked_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        omega: float,
        *,
        anchor_mask: torch.Tensor | None = None,
        masking: str = "token",
        modulated_by_prob: bool = False,
    ):
        validate_masking(masking)
        if masking == "attention" and anchor_mask is None:
            raise ValueError("masking='attention' needs anchor_mask")
        self.model = model
        self.omega = float(omega)
        self.modulated_by_prob = modulated_by_prob
        device = model_device(model)
        padding = attention_mask.to(device).bool()
        self.masked_input_ids = masked_input_ids.to(device)
        self.positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
        keep = padding if masking == "token" else padding & ~anchor_mask.to(device).bool()
        self.masked_attention = keep.long()
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
        batch, length = self.masked_input_ids.shape
        if input_ids.shape[0] % batch or input_ids.shape[1] != length:
            raise ValueError(
                f"generate's inputs have shape {tuple(input_ids.shape)} but the processor was built for "
                f"{batch} prompts of padded length {length}. Build the processor from the same prompts "
                "(SPALogitsProcessor.prepare) for every generate call; beam search is not supported."
            )
        repeats = input_ids.shape[0] // batch
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
        mask_token: str | int | None = "auto",
        masking: str = "token",
        modulated_by_prob: bool = False,
        add_bos: bool | None = None,
    ) -> tuple[dict[str, torch.Tensor], "SPALogitsProcessor"]:
        """Left-padded ``generate`` inputs for ``prompts`` and the matching processor."""
        anchored = anchor_prompts(tokenizer, prompts, anchors, add_bos=add_bos)
        mask_token_id = resolve_mask_token_id(tokenizer, mask_token)
        width = max(len(a.input_ids) for a in anchored)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else mask_token_id

        def left_pad(rows, fill):
            return torch.tensor([[fill] * (width - len(r)) + list(r) for r in rows])

        device = model_device(model)
        input_ids = left_pad([a.input_ids for a in anchored], pad_id).to(device)
        attention_mask = left_pad([[1] * len(a.input_ids) for a in anchored], 0).to(device)
        masked = left_pad([masked_prompt_ids(a.input_ids, a.anchor_mask, mask_token_id) for a in anchored], pad_id)
        anchor_mask = left_pad([a.anchor_mask for a in anchored], False)
        processor = cls(
            model,
            masked if masking == "token" else input_ids,
            attention_mask,
            omega,
            anchor_mask=anchor_mask,
            masking=masking,
            modulated_by_prob=modulated_by_prob,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask}, processor
