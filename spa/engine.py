"""Exact, batched Selective Prompt Anchoring decoding (paper eq. 16-18).

At every step ``logits = omega * f(prompt) + (1 - omega) * f(masked prompt)``. The original and the
masked view of every sequence in a batch go through the model in ONE forward of 2B rows (the layout,
left padding, attention masks and position ids of each view, is :mod:`spa.views`): one KV cache for all
rows reused across steps, the same chosen token appended to both views of a sequence, finished
sequences dropped from the batch (their rows leave the cache), logits combined in float32.

The masked view is either the prompt with its anchored ids replaced in place (``anchor_masks`` +
``mask_token_id``, the paper) or hidden by attention (``masking="attention"``), or any token-id list
(``masked_prompts``: e.g. the anchored text replaced by one mask string and tokenized again, see
:func:`spa.masking.masked_view`).

omega = 1 needs only the original view and omega = 0 only the masked one: those runs cost what plain
decoding costs.
"""

from __future__ import annotations

import inspect
import itertools
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

from spa.errors import ConfigError
from spa.masking import TEXT_MASKING, masked_prompt_ids, validate_masking
from spa.views import build_views, views_for

# A stopping criterion in transformers' convention: (generated ids of the active sequences, combined
# scores) -> bool per sequence. transformers.StopStringCriteria fits; it only sees generated ids, so a
# stop string can never match inside the prompt.
StoppingCriterion = Callable[[torch.LongTensor, torch.FloatTensor], torch.BoolTensor]
# A per-token stop rule: stop_rule(prompt_index, sample_index, token_id) -> bool. It is called exactly
# once for every token a sequence generates, in order (the tokens it sees are the ids decode returns for
# that sequence), whatever else ends the sequence at that token (EOS, max_new_tokens, a criterion);
# calls for different sequences interleave step by step. True ends the sequence after this token, which
# stays in its ids. Being called in order, it may keep state per (prompt, sample), e.g. decode the text
# so far and look for a stop pattern.
StopRule = Callable[[int, int, int], bool]
# Called after every forward with (index of the token the forward predicts, the model outputs, the
# (prompt index, sample index) of each active sequence, the views in row order). Rows are interleaved:
# [sequence 0 view 0, sequence 0 view 1, sequence 1 view 0, ...], columns as spa.views lays them out (a
# masked view of another length than its prompt has a hole after the shared prefix). Used by spa.attention.
StepObserver = Callable[[int, Any, list[tuple[int, int]], tuple[str, ...]], None]
# Called before every model forward with (the (prompt index, sample index) of each row, the rows' attention mask
# over every column so far, 2D, 1 = a real token the row attends to). Used by spa.pasta to lay out its steering.
ForwardPreparer = Callable[[list[tuple[int, int]], torch.Tensor], None]


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
    original: torch.Tensor, masked: torch.Tensor, omega: float | torch.Tensor, modulated_by_prob: bool = False
) -> torch.Tensor:
    """SPA's augmented logits in float32; ``omega`` is one number, or a (rows, 1) tensor with one per row.

    The weights ``omega`` and ``1 - omega`` are formed in float64 and only then rounded to float32, as a Python
    number is, so a row's scores are bit for bit the same whether its omega comes alone or in a tensor.

    ``modulated_by_prob`` is the official ``anchoring`` package's weighting (used there only when
    |omega| > 1): ``original + (omega - 1) * p / max(p) * (original - masked)`` with ``p`` the softmax
    of the original logits clamped at 1e-6. The package takes ``max(p)`` over the whole batch, which
    makes a row's tokens depend on its batch mates; here it is per row. The package's ad-hoc clamping of
    the adjustment (+-100) and of the scores (+-1000) is left out.
    """
    original = original.float()
    masked = masked.float()
    omega = torch.as_tensor(omega, dtype=torch.float64, device=original.device)
    linear = omega.float() * original + (1.0 - omega).float() * masked
    if not modulated_by_prob:
        return linear
    probs = F.softmax(original, dim=-1).clamp(min=1e-6)
    weights = (omega - 1.0).float() * probs / probs.amax(dim=-1, keepdim=True)
    return torch.where(omega.abs() > 1, original + weights * (original - masked), linear)


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
    anchor_masks: Sequence[Sequence[bool]] | None = None,
    omega: float | Sequence[float] | None = None,
    mask_token_id: int | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    *,
    masked_prompts: Sequence[Sequence[int]] | None = None,
    masking: str = "token",
    modulated_by_prob: bool = False,
    stopping_criteria: Sequence[StoppingCriterion] = (),
    stop_rule: StopRule | None = None,
    progress: bool = False,
    observer: StepObserver | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    before_forward: ForwardPreparer | None = None,
    **sampling,
) -> list[list[int]]:
    """Decode every prompt with SPA and return the new ids of each (no prompt, no padding).

    The masked view is given ONE way: ``anchor_masks`` (+ ``mask_token_id`` for ``masking="token"``),
    or ``masked_prompts``; at omega = 1 it may be left out.

    Args:
        prompts: unpadded token-id lists (BOS included if the model expects it).
        anchor_masks: same shapes as ``prompts``, True where a token is anchored.
        omega: anchoring strength; 1 = plain model, > 1 amplifies the anchored tokens, 0 = masked prompt. One
            number, or one per prompt: prompts of different strengths (the cells of a sweep) then share forward
            passes, and each prompt's ids are those it gets decoded alone.
        mask_token_id: the id that replaces anchored tokens in the masked view (``masking="token"``).
        max_new_tokens: at most this many new ids per sequence: one int, or one per prompt (0: nothing is
            generated for that prompt, its result is ``[]``).
        eos_token_id: one or several ids; a sequence stops after the first of them (included in its ids).
        batch_size: sequences per forward pass (each costs two rows: original and masked view);
            None = all at once. Sequences are grouped by the views they need and by prompt length to limit
            padding; results do not depend on the grouping. Sequences of one batch with identical views
            (one prompt at several omegas, or its samples) are prefilled once and share that KV cache.
        masked_prompts: instead of ``anchor_masks``: the masked view of each prompt as token ids of any
            length (e.g. :func:`spa.masking.masked_view` with ``"replace"`` or ``"delete"``), used as they
            are. Each view has its own left padding and position ids.
        masking: how ``anchor_masks`` mask: ``"token"`` (the paper: anchored ids replaced by
            ``mask_token_id``) or ``"attention"`` (ids kept; the masked view cannot attend to anchored
            positions, at every step). The text-level ``"replace"`` and ``"delete"`` need the text: build
            ``masked_prompts`` with :func:`spa.masking.masked_view`, or use :func:`spa.generate`.
        modulated_by_prob: the official package's probability-modulated weighting (per row).
        stopping_criteria: extra per-sequence stops, called on generated ids only.
        stop_rule: ``stop_rule(prompt_index, sample_index, token_id) -> bool``, see :data:`StopRule`.
        observer, forward_kwargs: instrumentation (see :data:`StepObserver`); ``forward_kwargs`` go to
            every model forward, e.g. ``{"output_attentions": True}``.
        before_forward: called before every model forward, see :data:`ForwardPreparer`.
        **sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``num_samples``
            (samples per prompt; the result then holds ``num_samples`` entries per prompt, prompt-major).
    """
    if omega is None or max_new_tokens is None:
        raise TypeError("spa.decode needs omega and max_new_tokens, e.g. decode(model, prompts, omega=1.3, masked_prompts=..., max_new_tokens=256)")
    validate_masking(masking)
    config = Sampling.from_kwargs(**sampling)
    prompts = [list(prompt) for prompt in prompts]
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
    omegas = _omegas(omega, len(prompts))
    masked, masked_keep = resolve_masked_views(prompts, anchor_masks=anchor_masks, mask_token_id=mask_token_id,
                                       masked_prompts=masked_prompts, masking=masking,
                                       omega=next((o for o in omegas if o != 1.0), 1.0))
    budgets = _budgets(max_new_tokens, len(prompts))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def row_width(prompt_index: int) -> int:
        return max(len(prompts[prompt_index]), len(masked[prompt_index]) if masked is not None else 0)

    # Chunks hold sequences that need the same views; widest first so that chunks hold prompts of similar length,
    # and one prompt's sequences side by side (its anchor conditions, then identical masked views: its omegas and
    # samples), so that they land in one chunk and share the rows they have in common (see _decode_chunk).
    first_original: dict[tuple, int] = {}
    first_masked: dict[tuple, int] = {}
    same_original = [first_original.setdefault(tuple(prompt), p) for p, prompt in enumerate(prompts)]
    same_masked = [first_masked.setdefault((tuple(masked[p]) if masked is not None else (),
                                            tuple(masked_keep[p]) if masked_keep is not None else ()), p)
                   for p in range(len(prompts))]
    sequences = [(p, s) for p in range(len(prompts)) for s in range(config.num_samples)]
    results: list[list[int]] = [[] for _ in sequences]
    order = sorted((i for i, (p, _) in enumerate(sequences) if budgets[p] > 0),
                   key=lambda i: (views_for(omegas[sequences[i][0]]), -row_width(sequences[i][0]),
                                  same_original[sequences[i][0]], same_masked[sequences[i][0]]))
    chunks = []
    for views, members in itertools.groupby(order, key=lambda i: views_for(omegas[sequences[i][0]])):
        members = list(members)
        step = batch_size or len(members)
        chunks.extend((views, members[start : start + step]) for start in range(0, len(members), step))
    bar = tqdm(total=len(order), desc="SPA decode", unit="seq", disable=not progress)
    for views, members in chunks:
        keys = [sequences[i] for i in members]
        decoded = _decode_chunk(
            model,
            [prompts[p] for p, _ in keys],
            [masked[p] for p, _ in keys] if masked is not None else None,
            [masked_keep[p] for p, _ in keys] if masked_keep is not None else None,
            keys,
            [budgets[p] for p, _ in keys],
            omegas=[omegas[p] for p, _ in keys],
            views=views,
            eos_ids=eos_ids,
            modulated_by_prob=modulated_by_prob,
            stopping_criteria=stopping_criteria,
            stop_rule=stop_rule,
            sampling=config,
            observer=observer,
            forward_kwargs=dict(forward_kwargs or {}),
            before_forward=before_forward,
        )
        for i, ids in zip(members, decoded):
            results[i] = ids
        bar.update(len(members))
    bar.close()
    return results


def resolve_masked_views(
    prompts: Sequence[Sequence[int]],
    *,
    anchor_masks: Sequence[Sequence[bool]] | None = None,
    mask_token_id: int | None = None,
    masked_prompts: Sequence[Sequence[int]] | None = None,
    masking: str = "token",
    omega: float,
) -> tuple[list[list[int]] | None, list[list[bool]] | None]:
    """The masked view of each prompt, from the ONE form it was given in (see :func:`decode`).

    Returns (masked ids per prompt, attention keep-masks per prompt). The keep-masks are None unless
    ``masking="attention"``; both are None when omega = 1 got no masked view.
    """
    if masked_prompts is not None:
        if anchor_masks is not None or mask_token_id is not None:
            raise ValueError(
                "spa.decode got masked_prompts together with anchor_masks/mask_token_id. Give the masked view "
                "one way only: masked_prompts=[ids, ...] (token ids of any length), or anchor_masks with "
                "mask_token_id (anchored ids replaced in place)."
            )
        if masking != "token":
            raise ValueError(
                f"masking={masking!r} builds the masked view (from anchor_masks, or from the text for 'replace' "
                "and 'delete', see spa.masked_view), but masked_prompts were given and are used as they are. "
                "Leave masking at its default with masked_prompts, or pass anchor_masks instead of "
                "masked_prompts for masking='attention'."
            )
        if len(masked_prompts) != len(prompts):
            raise ValueError(
                f"spa.decode got {len(masked_prompts)} masked prompts for {len(prompts)} prompts. Give one "
                "masked prompt (a token-id list) per prompt, in the same order."
            )
        masked = [list(ids) for ids in masked_prompts]
        for index, ids in enumerate(masked):
            if len(ids) == 0:
                raise ValueError(
                    f"masked prompt {index} is empty: the masked view needs at least one token. Keep BOS or "
                    "put a mask token where the anchored text was (masking='replace' instead of 'delete')."
                )
        return masked, None
    if masking in TEXT_MASKING:
        raise ConfigError(
            f"masking={masking!r} rewrites the prompt text, which spa.decode does not see. Build the masked "
            f"prompts with spa.masked_view(tokenizer, text, anchor_spans, {masking!r}) and pass "
            f"masked_prompts=..., or call spa.generate(..., masking={masking!r})."
        )
    if anchor_masks is None:
        if mask_token_id is not None:
            raise ValueError(
                "spa.decode got mask_token_id but no anchor_masks, so it cannot tell which ids to replace. "
                "Pass anchor_masks (True where a token is anchored), or masked_prompts instead of both."
            )
        if omega != 1.0:
            raise ValueError(
                f"omega={omega} needs the masked view of each prompt: pass masked_prompts=[ids, ...] or "
                "anchor_masks with mask_token_id. Only omega=1 (the plain model) decodes without one."
            )
        return None, None
    if len(anchor_masks) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(anchor_masks)} anchor masks")
    for index, (prompt, anchor_mask) in enumerate(zip(prompts, anchor_masks)):
        if len(prompt) != len(anchor_mask):
            raise ValueError(f"prompt {index} has {len(prompt)} ids but its anchor mask has {len(anchor_mask)}")
    if masking == "attention":
        return prompts, [[not anchored for anchored in anchor_mask] for anchor_mask in anchor_masks]
    if mask_token_id is None:
        raise ValueError(
            "masking='token' with anchor_masks needs mask_token_id, the id that replaces anchored tokens "
            "(spa.resolve_mask_token_id(tokenizer)); or pass masked_prompts instead of anchor_masks."
        )
    return [masked_prompt_ids(p, m, mask_token_id) for p, m in zip(prompts, anchor_masks)], None


def _omegas(omega: float | Sequence[float], n_prompts: int) -> list[float]:
    """The anchoring strength of each prompt, from one number or one per prompt."""
    if isinstance(omega, (int, float, np.integer, np.floating)):
        return [float(omega)] * n_prompts
    omegas = [float(o) for o in omega]
    if len(omegas) != n_prompts:
        raise ValueError(f"omega holds {len(omegas)} values for {n_prompts} prompts: give one number for all, or one per prompt.")
    return omegas


def _budgets(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    """New tokens allowed per prompt."""
    if isinstance(max_new_tokens, (int, np.integer)):
        budgets = [int(max_new_tokens)] * n_prompts
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != n_prompts:
            raise ValueError(
                f"max_new_tokens holds {len(budgets)} values for {n_prompts} prompts: give one int for all, "
                "or one per prompt."
            )
    if any(b < 0 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return budgets


def distinct_rows(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are equal in every one of ``columns`` (tensors of one row count): (the index of the first row of
    each distinct kind, in row order; for every row, the position of its kind among them)."""
    key = torch.cat([column.long() for column in columns], dim=1)
    _, kind = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(kind), device=key.device)
    first = torch.full((int(kind.max()) + 1,), len(kind), device=key.device).scatter_reduce(0, kind, rows, reduce="amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=key.device)
    return first[order], rank[kind]


@torch.inference_mode()
def _decode_chunk(
    model,
    prompts: list[list[int]],
    masked: list[list[int]] | None,
    masked_keep: list[list[bool]] | None,
    sequence_keys: list[tuple[int, int]],
    budgets: list[int],
    *,
    omegas: list[float],
    views: tuple[str, ...],
    eos_ids: list[int],
    modulated_by_prob: bool,
    stopping_criteria: Sequence[StoppingCriterion],
    stop_rule: StopRule | None,
    sampling: Sampling,
    observer: StepObserver | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    before_forward: ForwardPreparer | None = None,
) -> list[list[int]]:
    device = model_device(model)
    n = len(prompts)
    n_views = len(views)
    batch = build_views(prompts, masked, views=views, masked_keep=masked_keep, device=device)
    n_rows = batch.input_ids.shape[0]
    # Identical rows (one prompt's original view under every anchor condition and omega, a masked view under every
    # omega, a prompt's samples) are prefilled once: ``distinct`` holds one row of each kind and ``copy_of`` the one
    # each row copies after the first forward. Instrumented runs (observer, before_forward) see every row.
    share = observer is None and before_forward is None
    every = torch.arange(n_rows, device=device)
    distinct, copy_of = distinct_rows(batch.input_ids, batch.attention_mask, batch.position_ids) if share else (every, every)
    # The weights on each view, formed in float64 and rounded once, as combine_logits forms them.
    weights = torch.tensor(omegas, dtype=torch.float64, device=device)[:, None]
    weight_original, weight_masked = weights.float(), (1.0 - weights).float()
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

    def forward(step: int, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One step over all rows -> float32 scores of each active sequence; ``rows``: the row of each active
        sequence's view among the rows given (the first step of shared prefills), its cache copied there."""
        if before_forward is not None:
            before_forward([sequence_keys[i] for i in active.tolist() for _ in views], mask)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True, **forward_kwargs)
        outputs = model.base_model(**kwargs) if fused_head else model(**kwargs, **logits_to_keep)
        if observer is not None:
            observer(step, outputs, [sequence_keys[i] for i in active.tolist()], views)
        last = outputs.last_hidden_state[:, -1] if fused_head else outputs.logits[:, -1]
        if rows is not None:
            last = last[rows]
            cache.batch_select_indices(rows)
        if fused_head:
            hidden = last.float()
            combined = weight_original[active] * hidden[0::2] + weight_masked[active] * hidden[1::2]
            head = model.get_output_embeddings()
            return head(combined.to(head.weight.dtype)).float()
        if n_views == 1:
            return last.float()
        return combine_logits(last[0::2], last[1::2], weights[active], modulated_by_prob)

    # Both views agree up to the first differing token (spa.views aligns those columns even when the
    # views differ in length): that prefix is prefilled once per distinct prefix and its cache copied to the rows.
    shared = batch.shared
    if shared > 0:
        if share:
            prefix_rows, prefix_of = distinct_rows(*(t[distinct, :shared] for t in (batch.input_ids, batch.attention_mask, batch.position_ids)))
            prefix_rows = distinct[prefix_rows]
        else:
            prefix_rows, prefix_of = every[batch.rows(views[0])], every // n_views
            if before_forward is not None:
                before_forward(sequence_keys, batch.attention_mask[prefix_rows, :shared])
        model.base_model(input_ids=batch.input_ids[prefix_rows, :shared], attention_mask=batch.attention_mask[prefix_rows, :shared],
                         position_ids=batch.position_ids[prefix_rows, :shared], past_key_values=cache, use_cache=True)
        cache.batch_select_indices(prefix_of)
    active = torch.arange(n, device=device)  # chunk indices of unfinished sequences
    scores = forward(0, batch.input_ids[distinct, shared:], batch.attention_mask[distinct], batch.position_ids[distinct, shared:],
                     copy_of if len(distinct) < n_rows else None)
    attention = batch.attention_mask
    if bool(scores.isnan().any()):
        # Seen with transformers' eager attention in float64 on left-padded batches: fully masked padding
        # rows become NaN and spread. Fail loudly instead of decoding garbage.
        raise ValueError(
            f"The model produced NaN logits at the first step (dtype {model.dtype}, attention "
            f"{getattr(model.config, '_attn_implementation', '?')}, {n} prompts of {min(map(len, prompts))}-"
            f"{max(map(len, prompts))} tokens). Left padding with eager attention in float64 does this in "
            "transformers; use float32/bf16, SDPA attention, or batch_size=1."
        )

    warpers = sampling.warpers() if sampling.do_sample else []
    generators = [sampling.generator(p, s, device) for p, s in sequence_keys] if sampling.do_sample else []
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    budget = torch.tensor(budgets, device=device)
    generated = torch.zeros(n, max(budgets), dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    next_position = batch.position_ids[:, -1:] + 1
    for step in range(max(budgets)):
        if sampling.do_sample:
            for warper in warpers:
                scores = warper(generated[active, :step], scores)
            noise = torch.stack([torch.rand(scores.shape[-1], generator=generators[i], device=device) for i in active.tolist()])
            tokens = torch.argmax(F.log_softmax(scores, dim=-1) - torch.log(-torch.log(noise)), dim=-1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        generated[active, step] = tokens
        lengths[active] += 1
        finished = (lengths[active] >= budget[active]) | torch.isin(tokens, eos)
        for criterion in stopping_criteria:
            finished |= criterion(generated[active, : step + 1], scores).to(device)
        if stop_rule is not None:
            stops = [bool(stop_rule(*sequence_keys[i], token)) for i, token in zip(active.tolist(), tokens.tolist())]
            finished |= torch.tensor(stops, device=device)
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
