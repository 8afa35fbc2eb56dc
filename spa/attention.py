"""Attention dilution: the share of a model's attention on the prompt at each generated token.

The paper's Section 2 and Appendix A.1 (Figures 2 and 3) measure, over greedy generation, how much of
a code LLM's attention lies on the prompt versus on the tokens it generated itself, in two ways:

* **self-attention** (eq. 20): the last layer's attention row of the query that predicts the next
  token, averaged over heads; the share is the weight on prompt positions.
* **gradient-based** (eq. 21-22): the gradient of the chosen token's logit with respect to the input
  embeddings; each token scores the L2 norm of its gradient, the share is the prompt tokens' sum over
  the sum over all tokens.

**Step t** is the forward pass that chooses generated token ``t`` (0-based): its last query is the
last prompt token at t = 0 and generated token t - 1 afterwards, and its context is the prompt plus
generated tokens ``0 .. t-1``. At t = 0 the context is all prompt, so both shares are exactly 1: the
curves start at 100% as in the paper's figures.

Decoding is :func:`spa.decode` (plain greedy at omega = 1, SPA otherwise). Under SPA:

* self-attention is read from the **original view** (the model reading the real prompt plus the
  SPA-chosen tokens); the masked view's attention is not recorded. At omega = 0 only the masked
  view exists, and it is the one recorded.
* the gradient (``gradient_target="chosen_logit"``) is that of the **combined logit** ``omega * f(E)[tok] + (1 - omega) * f(E_mask)[tok]``
  with respect to the one embedding matrix ``E`` of prompt + generated tokens that both views share:
  ``E_mask`` is ``E`` with the anchored rows replaced by the mask token's embedding
  (``masking="token"``), or ``E`` itself with anchored positions hidden from attention
  (``masking="attention"``). Anchored rows then get gradient only through the original view.

``gradient_target="top100_logit_sum"`` is the authors' Figure 3 instead: the gradient of the sum of the
original view's 100 largest logits (the masked view plays no part, so any masking works, a re-tokenized
masked view included).

Self-attention comes from the decoder's KV-cached forwards: one query row per step, reduced to one
number per sequence at once. It needs attention weights, which only eager attention returns
(``spa.load_model(..., attn_implementation="eager")``). The gradient needs one full forward and
backward (no cache) per measured step, hence step subsampling (``grad_every``) and task subsampling
(``grad_task_ids``). Gradients go through bitsandbytes 8-/4-bit layers too: bitsandbytes' backward
uses the dequantized weights. A model whose kernels have no backward fails a one-token probe before
anything is decoded, with an error that names the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from spa.errors import ConfigError
from spa.engine import _accepts_logits_to_keep, combine_logits, decode, model_device
from spa.masking import TEXT_MASKING, validate_masking
from spa.views import build_views, left_pad, views_for

__all__ = [
    "AttentionWeightsUnavailable",
    "GradientsUnavailable",
    "context_shares",
    "gradient_prompt_shares",
    "last_row_shares",
    "measure_attention",
]


class AttentionWeightsUnavailable(ConfigError):
    """The model's forward returned no attention weights."""


class GradientsUnavailable(ConfigError):
    """The model cannot give gradients of its logits with respect to its input embeddings."""


def context_shares(
    scores: torch.Tensor, n_prompt: int | torch.Tensor, n_generated: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt share, generated share) of non-negative per-token scores over a left-padded context.

    ``scores`` is ``[..., keys]``: any left padding, then ``n_prompt`` prompt tokens, then
    ``n_generated`` generated tokens (ints, or tensors of shape ``scores.shape[:-1]``). Both shares
    are divided by the sum over ALL columns, padding included, so they sum to 1 exactly when the
    padding carries nothing, as it must.
    """
    keys = scores.shape[-1]
    n_prompt = torch.as_tensor(n_prompt, device=scores.device).unsqueeze(-1)
    n_generated = torch.as_tensor(n_generated, device=scores.device).unsqueeze(-1)
    if bool((n_prompt < 1).any()) or bool((n_generated < 0).any()) or bool((n_prompt + n_generated > keys).any()):
        raise ValueError(f"{n_prompt.flatten().tolist()} prompt + {n_generated.flatten().tolist()} generated tokens do not fit in {keys} columns")
    column = torch.arange(keys, device=scores.device)
    generated_start = keys - n_generated
    zero = scores.new_zeros(())
    total = scores.sum(-1)
    prompt = torch.where((column >= generated_start - n_prompt) & (column < generated_start), scores, zero).sum(-1)
    generated = torch.where(column >= generated_start, scores, zero).sum(-1)
    return prompt / total, generated / total


def last_row_shares(attention: torch.Tensor, step: int, n_prompt: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt share, generated share) per row of one layer's attention at step ``step``.

    ``attention`` is ``[rows, heads, queries, keys]`` from a left-padded, KV-cached forward: the keys
    are the padded prompt columns followed by the ``step`` generated tokens, and the last query is the
    one that predicts generated token ``step``. Heads are averaged; each head's row sums to 1, so this
    is also the mean of the heads' own shares.
    """
    return context_shares(attention[:, :, -1].float().mean(dim=1), n_prompt, step)


def _not_finite(what: str, dtype: torch.dtype, unpadded: str) -> ConfigError:
    return ConfigError(
        f"The {what} shares are NaN or infinite (model dtype {dtype}). In float64, transformers' eager "
        "attention turns the mask of left padding into -inf (its softmax runs in float32), so padded rows "
        f"become NaN and spread; in half precision the gradient can overflow. Load the model with "
        f"dtype=fp32 (or bf16), or avoid padding with {unpadded}."
    )


class _SelfAttentionRecorder:
    """The :data:`spa.engine.StepObserver` that keeps the last layer's prompt share of every sequence."""

    def __init__(self, n_sequences: int, every: int):
        self.every = every
        self.steps: list[list[int]] = [[] for _ in range(n_sequences)]
        self.shares: list[list[float]] = [[] for _ in range(n_sequences)]

    def __call__(self, step: int, outputs: Any, sequence_keys: list[tuple[int, int]], views: tuple[str, ...]) -> None:
        if step % self.every:
            return
        attentions = getattr(outputs, "attentions", None)
        if not attentions or attentions[-1] is None:
            raise AttentionWeightsUnavailable(
                "The model returned no attention weights (outputs.attentions is empty), so the self-attention "
                "share cannot be measured: only eager attention returns them. Load the model with "
                "attn_implementation='eager' (spa.load_model(..., attn_implementation='eager'), or call "
                "model.set_attn_implementation('eager') on a loaded model), or turn the self-attention "
                "measurement off with self_every=null."
            )
        # The original view is the model reading the real prompt; omega = 0 has only the masked one.
        view = views.index("original") if "original" in views else 0
        rows = attentions[-1][view :: len(views)]
        prompts = [index for index, _ in sequence_keys]
        # Every column before the generated tokens is the prompt's: padding and the holes of a view of
        # another length (spa.views) carry zero attention, so they add nothing.
        prompt_share, _ = last_row_shares(rows, step, rows.shape[-1] - step)
        if not bool(torch.isfinite(prompt_share).all()):
            raise _not_finite("attention", rows.dtype, "batch_size=1")
        for index, share in zip(prompts, prompt_share.tolist()):
            self.steps[index].append(step)
            self.shares[index].append(share)


GRADIENT_TARGETS: tuple[str, ...] = ("chosen_logit", "top100_logit_sum")


def _check_measurable(masking: str, gradient_target: str, text_level_view: bool, measures_gradient: bool = True) -> None:
    """The combined-logit gradient needs one embedding matrix for both views: the same length."""
    if gradient_target not in GRADIENT_TARGETS:
        raise ConfigError(f"Unknown gradient target {gradient_target!r}; use one of {', '.join(GRADIENT_TARGETS)}.")
    text_level = validate_masking(masking) in TEXT_MASKING or text_level_view
    if measures_gradient and text_level and gradient_target == "chosen_logit":
        raise ConfigError(
            "The gradient of the combined logit (gradient_target='chosen_logit') needs a masked view of the "
            f"prompt's own length, but masking={masking!r} gives the masked view other tokens. Use masking='token' "
            "or 'attention', or gradient_target='top100_logit_sum' (the authors' definition: the original view "
            "alone), or turn the gradient measurement off (grad_every=None)."
        )


@contextmanager
def _parameters_frozen(model):
    """Parameters stop requiring grad for a while: autograd then keeps only what input gradients need."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _gradient_shares_batch(
    model, prompt: list[int], anchor_mask: list[bool], generated: list[int], steps: list[int],
    *, omega: float, mask_token_id: int, masking: str, gradient_target: str = "chosen_logit",
) -> list[float]:
    """Gradient prompt shares of ``steps`` of one sequence, from one left-padded forward and backward."""
    if gradient_target == "top100_logit_sum":
        omega = 1.0  # the original view alone
    device = model_device(model)
    n_prompt = len(prompt)
    contexts = [prompt + generated[:t] for t in steps]
    keeps = [[not (masking == "attention" and a) for a in anchor_mask] + [True] * t for t in steps]
    # Rows, attention and positions as spa.decode lays out its sequences (one per step here). Both
    # views hold the context ids: token masking happens on the embeddings below, so that both views
    # read the one embedding matrix E. Views of equal length are only left-padded (no holes).
    batch = build_views(contexts, contexts, views=views_for(omega), masked_keep=keeps, pad_id=mask_token_id, device=device)
    width = batch.input_ids.shape[1]
    embedding = model.get_input_embeddings()
    embeds = embedding(batch.input_ids[:: len(batch.views)]).detach().requires_grad_(True)
    if masking == "token":
        anchored = left_pad([list(anchor_mask) + [False] * t for t in steps], width, False, device)
        masked_embeds = torch.where(anchored[..., None], embedding(torch.tensor(mask_token_id, device=device)), embeds)
    else:
        masked_embeds = embeds
    embeds_of = {"original": embeds, "masked": masked_embeds}
    inputs = torch.stack([embeds_of[v] for v in batch.views], dim=1).flatten(0, 1)
    last_only = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    logits = model(inputs_embeds=inputs, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, **last_only).logits[:, -1]
    scores = logits.float() if len(batch.views) == 1 else combine_logits(logits[0::2], logits[1::2], omega)
    if gradient_target == "top100_logit_sum":
        target = scores.topk(min(100, scores.shape[-1]), dim=-1).values
    else:
        target = scores.gather(-1, torch.tensor([generated[t] for t in steps], device=device)[:, None])
    # Rows are independent, so the gradient of the sum holds each row's own gradient.
    (gradient,) = torch.autograd.grad(target.sum(), embeds)
    norms = gradient.float().norm(dim=-1)
    if not bool(torch.isfinite(norms).all()):
        raise _not_finite("gradient", gradient.dtype, "grad_batch_size=1")
    prompt_share, _ = context_shares(norms, n_prompt, torch.tensor(steps, device=device))
    return prompt_share.tolist()


def gradient_prompt_shares(
    model,
    prompt: Sequence[int],
    anchor_mask: Sequence[bool],
    generated: Sequence[int],
    steps: Sequence[int],
    *,
    omega: float,
    mask_token_id: int,
    masking: str = "token",
    batch_size: int = 1,
    gradient_target: str = "chosen_logit",
) -> list[float]:
    """Gradient-based prompt share (eq. 21-22) of each step in ``steps`` of one decoded sequence.

    Step ``t`` is the gradient of the logit of ``generated[t]`` given prompt + ``generated[:t]``
    (SPA: the combined logit, see the module docstring), or with ``gradient_target="top100_logit_sum"``
    of the sum of the 100 largest logits of the original view (the authors' Figure 3), taken with
    respect to the input embeddings;
    the share is the sum of the per-token gradient L2 norms over the prompt divided by their sum over
    all tokens. ``batch_size`` steps go through one left-padded forward and backward (memory grows
    with it, times two views under SPA). Parameters receive no gradient.
    """
    _check_measurable(masking, gradient_target, False)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not 0 <= t < len(generated) for t in steps):
        raise ValueError(f"steps must lie in [0, {len(generated)}), got {list(steps)}")
    prompt, anchor_mask, generated, steps = list(prompt), list(map(bool, anchor_mask)), list(generated), list(steps)
    shares: list[float] = []
    # Also outside a caller's inference_mode, whose tensors autograd cannot record.
    with torch.inference_mode(False), torch.enable_grad(), _parameters_frozen(model):
        for start in range(0, len(steps), batch_size):
            shares += _gradient_shares_batch(
                model, prompt, anchor_mask, generated, steps[start : start + batch_size],
                omega=float(omega), mask_token_id=mask_token_id, masking=masking, gradient_target=gradient_target,
            )
    return shares


def _check_gradients(model, prompt: Sequence[int], anchor_mask: Sequence[bool], *, omega: float, mask_token_id: int, masking: str,
                     gradient_target: str) -> None:
    """A one-step gradient on the first prompt tokens, so an unsupported model fails before decoding."""
    length = min(len(prompt), 4)
    try:
        gradient_prompt_shares(model, prompt[:length], anchor_mask[:length], [prompt[0]], [0], omega=omega,
                               mask_token_id=mask_token_id, masking=masking, gradient_target=gradient_target)
    except (torch.OutOfMemoryError, GradientsUnavailable):
        raise
    except Exception as error:  # kernels without backward raise anything (bitsandbytes: bare Exception)
        quantized = " (its weights are quantized)" if getattr(model, "is_quantized", False) else ""
        raise GradientsUnavailable(
            f"This model{quantized} cannot give gradients of its logits with respect to its input embeddings "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}), so the "
            "gradient-based share cannot be measured. Load the model in full precision with quantization=none "
            "for the gradient measurement, or turn it off with grad_every=null."
        ) from error


def measure_attention(
    model,
    prompts: Sequence[Sequence[int]],
    anchor_masks: Sequence[Sequence[bool]],
    task_ids: Sequence[str],
    *,
    omega: float,
    mask_token_id: int,
    max_new_tokens: int = 400,
    eos_token_id: int | Sequence[int] | None = None,
    self_every: int | None = 1,
    grad_every: int | None = 10,
    grad_task_ids: Collection[str] | None = None,
    grad_batch_size: int = 1,
    masking: str = "token",
    batch_size: int | None = 8,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    masked_prompts: Sequence[Sequence[int]] | None = None,
    gradient_target: str = "chosen_logit",
) -> list[dict]:
    """Greedy-decode every prompt (SPA at ``omega``) and measure its attention on the prompt per step.

    Returns one record per task, in input order::

        {"task_id", "n_prompt_tokens", "n_generated",
         "self_steps", "self_prompt_share", "grad_steps", "grad_prompt_share"}

    Steps are 0-based generated-token indices (step t: the forward that chooses token t, see the
    module docstring); shares lie in [0, 1]; a measurement that is off leaves its two lists empty.

    Args:
        prompts, anchor_masks, omega, mask_token_id, max_new_tokens, eos_token_id, masking: as for
            :func:`spa.decode` (``AnchoredPrompt.input_ids`` / ``.anchor_mask``); omega = 1 is plain
            greedy decoding.
        task_ids: one unique id per prompt.
        self_every: record the self-attention share at steps 0, k, 2k, ...; None = off (the model then
            needs no eager attention).
        grad_every: the gradient share at steps 0, k, 2k, ...; None = off.
        grad_task_ids: the tasks that get the gradient measurement (None = all).
        grad_batch_size: steps per gradient forward/backward.
        batch_size: tasks decoded together (longest prompts first). Eager attention materialises every
            layer's attention matrix for the prefill, so keep it small for long prompts and large models.
        progress: a tqdm bar over tasks.
        on_record: called with each task's record as soon as it is complete (in processing order),
            e.g. to append it to a JSONL file so that a long run can be watched or resumed.
        masked_prompts: an explicit masked view per prompt (any length, as for :func:`spa.decode`; the
            authors' replace masking) instead of ``anchor_masks`` + ``mask_token_id``; needs
            ``gradient_target="top100_logit_sum"`` or no gradient measurement.
        gradient_target: ``"chosen_logit"`` (the paper's eq. 21 under SPA: the combined logit of the chosen
            token) or ``"top100_logit_sum"`` (the authors' code: the sum of the original view's 100 largest
            logits, whatever ω chose).
    """
    _check_measurable(masking, gradient_target, masked_prompts is not None, measures_gradient=grad_every is not None)
    if masked_prompts is not None and len(masked_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(masked_prompts)} masked prompts")
    if not len(prompts) == len(anchor_masks) == len(task_ids):
        raise ValueError(f"{len(prompts)} prompts, {len(anchor_masks)} anchor masks and {len(task_ids)} task ids: need one of each per task")
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("task_ids must be unique: each task gets one record")
    for name, every in (("self_every", self_every), ("grad_every", grad_every), ("batch_size", batch_size)):
        if every is not None and every < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {every}")
    unknown = set(grad_task_ids or ()) - set(task_ids)
    if unknown:
        raise ValueError(f"grad_task_ids holds ids that are not among task_ids: {sorted(unknown)[:5]}")
    graded = set(task_ids) if grad_task_ids is None else set(grad_task_ids)
    if grad_every is not None and graded:
        first = next(i for i, task_id in enumerate(task_ids) if task_id in graded)
        _check_gradients(model, prompts[first], anchor_masks[first], omega=omega, mask_token_id=mask_token_id, masking=masking,
                         gradient_target=gradient_target)

    records: list[dict] = [{} for _ in task_ids]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    chunk = batch_size or max(len(order), 1)  # None: all tasks in one batch
    bar = tqdm(total=len(order), desc="attention", unit="task", disable=not progress)
    for start in range(0, len(order), chunk):
        members = order[start : start + chunk]
        recorder = _SelfAttentionRecorder(len(members), self_every) if self_every else None
        views = ({"masked_prompts": [masked_prompts[i] for i in members]} if masked_prompts is not None else
                 {"anchor_masks": [anchor_masks[i] for i in members], "mask_token_id": mask_token_id, "masking": masking})
        generated = decode(
            model, [prompts[i] for i in members], omega=omega, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            batch_size=len(members), observer=recorder, **views,
            forward_kwargs={"output_attentions": True} if recorder else None,
        )
        for position, (task, ids) in enumerate(zip(members, generated)):
            grad_steps = list(range(0, len(ids), grad_every)) if grad_every and task_ids[task] in graded else []
            grad_shares = gradient_prompt_shares(
                model, prompts[task], anchor_masks[task], ids, grad_steps,
                omega=omega, mask_token_id=mask_token_id, masking=masking, batch_size=grad_batch_size,
                gradient_target=gradient_target,
            ) if grad_steps else []
            records[task] = {
                "task_id": task_ids[task],
                "n_prompt_tokens": len(prompts[task]),
                "n_generated": len(ids),
                "self_steps": recorder.steps[position] if recorder else [],
                "self_prompt_share": recorder.shares[position] if recorder else [],
                "grad_steps": grad_steps,
                "grad_prompt_share": grad_shares,
            }
            if on_record is not None:
                on_record(records[task])
            bar.update(1)
    bar.close()
    return records
