"""Exact, batched Selective Prompt Anchoring decoding (paper eq. 16-18).

At every step ``logits = omega * f(prompt) + (1 - omega) * f(masked prompt)``. The original and the
masked view of every sequence in a batch go through the model in ONE forward of 2B rows: left padding
with explicit attention masks and position ids, one KV cache for all rows reused across steps, the same
chosen token appended to both views of a sequence, finished sequences dropped from the batch (their
rows leave the cache), logits combined in float32.

omega = 1 needs only the original view and omega = 0 only the masked one: those runs cost what plain
decoding costs.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from spa.masking import masked_prompt_ids, validate_masking

# A stopping criterion in transformers' convention: (generated ids of the active sequences, combined
# scores) -> bool per sequence. transformers.StopStringCriteria fits; it only sees generated ids, so a
# stop string can never match inside the prompt.
StoppingCriterion = Callable[[torch.LongTensor, torch.FloatTensor], torch.BoolTensor]
# Called after every forward with (index of the token the forward predicts, the model outputs, the
# (prompt index, sample index) of each active sequence, the views in row order). Rows are interleaved:
# [sequence 0 view 0, sequence 0 view 1, sequence 1 view 0, ...]. Used by spa.attention.
StepObserver = Callable[[int, Any, list[tuple[int, int]], tuple[str, ...]], None]


@dataclass(frozen=True)
class Sampling:
    """Token choice. Greedy (the paper) unless ``do_sample``; then temperature / top-k / top-p sampling.

    Sample ``j`` of prompt ``i`` draws from its own generator seeded by ``(seed, i, j)``, so a sample
    does not depend on the batch it was decoded in.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Sampling":
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"Unknown sampling argument(s) {sorted(unknown)}; spa.decode accepts "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        if "do_sample" not in kwargs:
            kwargs["do_sample"] = any(k in kwargs for k in ("temperature", "top_k", "top_p"))
        if kwargs.get("temperature", 1.0) == 0:
            kwargs["do_sample"] = False
        sampling = cls(**kwargs)
        if sampling.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {sampling.num_samples}")
        if sampling.do_sample and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1 and sampling.top_k >= 0):
            raise ValueError(
                f"Invalid sampling settings temperature={sampling.temperature}, top_p={sampling.top_p}, "
                f"top_k={sampling.top_k}: need temperature > 0, 0 < top_p <= 1, top_k >= 0."
            )
        return sampling

    def warpers(self) -> list:
        warpers = []
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def generator(self, prompt_index: int, sample_index: int, device: torch.device) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, prompt_index, sample_index]).generate_state(1)[0])
        return torch.Generator(device=device).manual_seed(seed)


def combine_logits(
    original: torch.Tensor, masked: torch.Tensor, omega: float, modulated_by_prob: bool = False
) -> torch.Tensor:
    """SPA's augmented logits in float32.

    ``modulated_by_prob`` is the official ``anchoring`` package's weighting (used there only when
    |omega| > 1): ``original + (omega - 1) * p / max(p) * (original - masked)`` with ``p`` the softmax
    of the original logits clamped at 1e-6. The package takes ``max(p)`` over the whole batch, which
    makes a row's tokens depend on its batch mates; here it is per row. The package's ad-hoc clamping of
    the adjustment (+-100) and of the scores (+-1000) is left out.
    """
    original = original.float()
    masked = masked.float()
    if modulated_by_prob and abs(omega) > 1:
        probs = F.softmax(original, dim=-1).clamp(min=1e-6)
        weights = (omega - 1.0) * probs / probs.amax(dim=-1, keepdim=True)
        return original + weights * (original - masked)
    return omega * original + (1.0 - omega) * masked


@lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


_AFFINE_HEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def head_is_affine(model) -> bool:
    """Whether the model's logits are exactly ``lm_head(last hidden state)`` (no soft-capping etc.).

    Checked once per model on a short input: the causal-LM forward against the decoder plus head.
    """
    if model not in _AFFINE_HEAD:
        head = model.get_output_embeddings()
        affine = isinstance(head, torch.nn.Linear) and getattr(model, "base_model", model) is not model
        if affine:
            ids = torch.arange(1, 6, device=model_device(model))[None] % model.config.vocab_size
            full = model(input_ids=ids).logits.double()
            split = head(model.base_model(input_ids=ids).last_hidden_state).double()
            affine = torch.allclose(full, split, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
        _AFFINE_HEAD[model] = affine
    return _AFFINE_HEAD[model]


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    anchor_masks: Sequence[Sequence[bool]],
    omega: float,
    mask_token_id: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    *,
    masking: str = "token",
    modulated_by_prob: bool = False,
    stopping_criteria: Sequence[StoppingCriterion] = (),
    progress: bool = False,
    observer: StepObserver | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **sampling,
) -> list[list[int]]:
    """Decode every prompt with SPA and return the new ids of each (no prompt, no padding).

    Args:
        prompts: unpadded token-id lists (BOS included if the model expects it).
        anchor_masks: same shapes as ``prompts``, True where a token is anchored.
        omega: anchoring strength; 1 = plain model, > 1 amplifies the anchored tokens, 0 = masked prompt.
        mask_token_id: the id that replaces anchored tokens in the masked view (``masking="token"``).
        max_new_tokens: at most this many new ids per sequence.
        eos_token_id: one or several ids; a sequence stops after the first of them (included in its ids).
        batch_size: sequences per forward pass (each costs two rows: original and masked view);
            None = all at once. Sequences are grouped by prompt length to limit padding; results do not
            depend on the grouping.
        masking: ``"token"`` (the paper: anchored ids replaced by ``mask_token_id``) or ``"attention"``
            (ids kept; the masked view cannot attend to anchored positions, at every step).
        modulated_by_prob: the official package's probability-modulated weighting (per row).
        stopping_criteria: extra per-sequence stops, called on generated ids only.
        observer, forward_kwargs: instrumentation (see :data:`StepObserver`); ``forward_kwargs`` go to
            every model forward, e.g. ``{"output_attentions": True}``.
        **sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``num_samples``
            (samples per prompt; the result then holds ``num_samples`` entries per prompt, prompt-major).
    """
    validate_masking(masking)
    config = Sampling.from_kwargs(**sampling)
    if len(prompts) != len(anchor_masks):
        raise ValueError(f"{len(prompts)} prompts but {len(anchor_masks)} anchor masks")
    for index, (prompt, anchor_mask) in enumerate(zip(prompts, anchor_masks)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
        if len(prompt) != len(anchor_mask):
            raise ValueError(f"prompt {index} has {len(prompt)} ids but its anchor mask has {len(anchor_mask)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    # One sequence per (prompt, sample); longest first so that chunks hold prompts of similar length.
    sequences = [(p, s) for p in range(len(prompts)) for s in range(config.num_samples)]
    order = sorted(range(len(sequences)), key=lambda i: -len(prompts[sequences[i][0]]))
    chunk = batch_size or len(sequences)
    results: list[list[int]] = [[] for _ in sequences]
    if max_new_tokens == 0:
        return results
    bar = tqdm(total=len(sequences), desc="SPA decode", unit="seq", disable=not progress)
    for start in range(0, len(order), chunk):
        members = order[start : start + chunk]
        decoded = _decode_chunk(
            model,
            [list(prompts[sequences[i][0]]) for i in members],
            [list(map(bool, anchor_masks[sequences[i][0]])) for i in members],
            [sequences[i] for i in members],
            omega=float(omega),
            mask_token_id=mask_token_id,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            masking=masking,
            modulated_by_prob=modulated_by_prob,
            stopping_criteria=stopping_criteria,
            sampling=config,
            observer=observer,
            forward_kwargs=dict(forward_kwargs or {}),
        )
        for i, ids in zip(members, decoded):
            results[i] = ids
        bar.update(len(members))
    bar.close()
    return results


def _shared_prefix_length(view_ids: torch.Tensor, view_attention: torch.Tensor) -> int:
    """Leading columns where both views of every sequence agree (ids and mask): prefilled once, then copied."""
    same = (view_ids[0::2] == view_ids[1::2]) & (view_attention[0::2] == view_attention[1::2])
    differs = (~same).any(dim=0).nonzero()
    width = view_ids.shape[1]
    # At least the last column is left for the paired prefill, which yields the first logits.
    return min(int(differs[0]) if differs.numel() else width, width - 1)


@torch.inference_mode()
def _decode_chunk(
    model,
    prompts: list[list[int]],
    anchor_masks: list[list[bool]],
    sequence_keys: list[tuple[int, int]],
    *,
    omega: float,
    mask_token_id: int,
    max_new_tokens: int,
    eos_ids: list[int],
    masking: str,
    modulated_by_prob: bool,
    stopping_criteria: Sequence[StoppingCriterion],
    sampling: Sampling,
    observer: StepObserver | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    device = model_device(model)
    n = len(prompts)
    width = max(map(len, prompts))
    # The views that contribute: omega = 1 is the plain model, omega = 0 the masked prompt alone.
    views = [v for v, needed in (("original", omega != 0.0), ("masked", omega != 1.0)) if needed]
    n_views = len(views)

    def left_pad(rows: list[list], fill) -> torch.Tensor:
        return torch.tensor([[fill] * (width - len(row)) + list(row) for row in rows], device=device)

    real = left_pad([[True] * len(p) for p in prompts], False)
    anchored = left_pad(anchor_masks, False)
    masked_ids = [masked_prompt_ids(p, m, mask_token_id) for p, m in zip(prompts, anchor_masks)] if masking == "token" else prompts
    ids_of = {"original": left_pad(prompts, mask_token_id), "masked": left_pad(masked_ids, mask_token_id)}
    attention_of = {"original": real, "masked": real & ~anchored if masking == "attention" else real}
    # Rows are interleaved per sequence: [seq0 view0, seq0 view1, seq1 view0, ...].
    input_ids = torch.stack([ids_of[v] for v in views], dim=1).flatten(0, 1)
    attention = torch.stack([attention_of[v] for v in views], dim=1).flatten(0, 1).long()
    # Positions count real tokens only (anchoring never shifts them), identical for both views.
    positions = (real.long().cumsum(-1) - 1).clamp(min=0).repeat_interleave(n_views, dim=0)
    # The LM head is affine, so omega * W h_o + (1 - omega) * W h_m = W (omega * h_o + (1 - omega) * h_m):
    # in full-precision models the head runs once per sequence on the combined hidden state. Half
    # precision keeps the per-view logits, so that they are combined in float32 as the paper computes.
    fused_head = (
        n_views == 2
        and not modulated_by_prob
        and model.get_output_embeddings().weight.dtype in (torch.float32, torch.float64)
        and head_is_affine(model)
    )
    logits_to_keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    cache = DynamicCache(config=model.config)

    def forward(step: int, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One step over all rows -> float32 scores of each active sequence."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True, **forward_kwargs)
        outputs = model.base_model(**kwargs) if fused_head else model(**kwargs, **logits_to_keep)
        if observer is not None:
            observer(step, outputs, [sequence_keys[i] for i in active.tolist()], tuple(views))
        if fused_head:
            hidden = outputs.last_hidden_state[:, -1].float()
            combined = omega * hidden[0::2] + (1.0 - omega) * hidden[1::2]
            head = model.get_output_embeddings()
            return head(combined.to(head.weight.dtype)).float()
        logits = outputs.logits[:, -1]
        if n_views == 1:
            return logits.float()
        return combine_logits(logits[0::2], logits[1::2], omega, modulated_by_prob)

    # Both views agree up to the first anchored token: that prefix is prefilled once and copied.
    shared = _shared_prefix_length(input_ids, attention) if n_views == 2 else 0
    if shared > 0:
        prefix_rows = torch.arange(0, n * n_views, n_views, device=device)
        model.base_model(input_ids=input_ids[prefix_rows, :shared], attention_mask=attention[prefix_rows, :shared],
                         position_ids=positions[prefix_rows, :shared], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n_views)
    active = torch.arange(n, device=device)  # chunk indices of unfinished sequences
    scores = forward(0, input_ids[:, shared:], attention, positions[:, shared:])
    if bool(scores.isnan().any()):
        # Seen with transformers' eager attention in float64 on left-padded batches: fully masked padding
        # rows become NaN and spread. Fail loudly instead of decoding garbage.
        raise ValueError(
            f"The model produced NaN logits at the first step (dtype {model.dtype}, attention "
            f"{getattr(model.config, '_attn_implementation', '?')}, {n} prompts of {min(map(len, prompts))}-{width} tokens). "
            "Left padding with eager attention in float64 does this in transformers; use float32/bf16, SDPA "
            "attention, or batch_size=1."
        )

    warpers = sampling.warpers() if sampling.do_sample else []
    generators = [sampling.generator(p, s, device) for p, s in sequence_keys] if sampling.do_sample else []
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    generated = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        if sampling.do_sample:
            for warper in warpers:
                scores = warper(generated[active, :step], scores)
            noise = torch.stack([torch.rand(scores.shape[-1], generator=generators[i], device=device) for i in active.tolist()])
            tokens = torch.argmax(F.log_softmax(scores, dim=-1) - torch.log(-torch.log(noise)), dim=-1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        generated[active, step] = tokens
        lengths[active] += 1
        if step + 1 == max_new_tokens:
            break
        finished = torch.isin(tokens, eos)
        for criterion in stopping_criteria:
            finished |= criterion(generated[active, : step + 1], scores).to(device)
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            active, tokens = active[keep], tokens[keep]
            rows = (keep[:, None] * n_views + torch.arange(n_views, device=device)).flatten()
            cache.batch_select_indices(rows)
            next_position, attention = next_position[rows], attention[rows]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=-1)
        scores = forward(step + 1, tokens.repeat_interleave(n_views).unsqueeze(-1), attention, next_position)
        next_position = next_position + 1
    return [generated[i, : lengths[i]].tolist() for i in range(n)]
