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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

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
        )
        for i, ids in zip(members, decoded):
            results[i] = ids
        bar.update(len(members))
    bar.close()
    return results


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
) -> list[list[int]]:
    device = model_device(model)
    n = len(prompts)
    width = max(map(len, prompts))
    # The views that contribute: omega = 1 is the plain model, omega = 0 the masked prompt alone.
    need_original = omega != 0.0
    need_masked = omega != 1.0
    pad_id = mask_token_id

    def left_pad(rows: list[list], fill) -> list[list]:
        return [[fill] * (width - len(row)) + row for row in rows]

    real = torch.tensor(left_pad([[True] * len(p) for p in prompts], False), device=device)
    anchored = torch.tensor(left_pad(anchor_masks, False), device=device)
    view_ids, view_attention = [], []
    if need_original:
        view_ids.append(left_pad(prompts, pad_id))
        view_attention.append(real)
    if need_masked:
        if masking == "token":
            view_ids.append(left_pad([masked_prompt_ids(p, m, mask_token_id) for p, m in zip(prompts, anchor_masks)], pad_id))
            view_attention.append(real)
        else:
            view_ids.append(left_pad(prompts, pad_id))
            view_attention.append(real & ~anchored)
    n_views = len(view_ids)
    input_ids = torch.tensor([row for rows in view_ids for row in rows], device=device)
    attention = torch.cat(view_attention).long()
    # Positions count real tokens only (anchoring never shifts them), identical for both views.
    positions = (real.long().cumsum(-1) - 1).clamp(min=0).repeat(n_views, 1)
    # Without holes in the mask, passing none lets SDPA take its fast causal path.
    if bool(attention.all()):
        attention = None

    warpers = sampling.warpers() if sampling.do_sample else []
    generators = [sampling.generator(p, s, device) for p, s in sequence_keys] if sampling.do_sample else []
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    generated = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # chunk indices of unfinished sequences

    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = outputs.logits[:, -1, :]
        n_active = active.numel()
        if n_views == 2:
            scores = combine_logits(logits[:n_active], logits[n_active:], omega, modulated_by_prob)
        else:
            scores = logits.float()
        history = generated[active, : step]
        if sampling.do_sample:
            for warper in warpers:
                scores = warper(history, scores)
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
            rows = torch.cat([keep + v * n_active for v in range(n_views)])
            cache.batch_select_indices(rows)
            next_position = next_position[rows]
            if attention is not None:
                attention = attention[rows]
        if attention is not None:
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=-1)
        outputs = model(
            input_ids=tokens.repeat(n_views).unsqueeze(-1),
            attention_mask=attention,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    return [generated[i, : lengths[i]].tolist() for i in range(n)]
