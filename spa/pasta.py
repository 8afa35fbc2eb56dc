"""PASTA, post-hoc attention steering (Zhang et al. 2023, "Tell Your Model Where to Attend", arXiv:2311.02262;
github.com/QingruZhang/PASTA, ``pastalib``), on this package's engine.

One forward per step. On the selected attention heads, the attention of every query (prompt and generated
tokens alike) to the prompt tokens OUTSIDE the emphasized text is multiplied by ``alpha`` and renormalized:

    a'_ij = a_ij * s_j / sum_k a_ik * s_k,   s_j = alpha if key j is a prompt token outside the emphasized text, else 1

which is ``log(alpha)`` added to those keys' attention scores before the softmax (pastalib's
``scale_position="exclude"``; generated tokens are never scaled). Unselected heads and layers are unchanged.

The scores get the bias through the attention mask each selected layer's attention module receives (a forward
pre-hook turns the mask into a float mask with one row of biases per head), as pastalib edits that mask; no model
code is replaced. It works with transformers' ``eager`` and ``sdpa`` attention functions and with CodeGen's own
attention (which adds the mask before dividing by sqrt(head_dim), so its bias is scaled by that). Batched,
left-padded prompts and the KV cache are handled by :func:`spa.decode` itself: before each forward it hands the
rows' prompt keys and attention mask to the steering, which lays the scaled keys out over the columns.

    heads = spa.pasta.resolve_heads(model.config, {"last_k_layers": 4})       # or "all", or {layer: [head, ...]}
    new_ids = spa.pasta.decode(model, prompts, emphasized_masks, alpha=0.01, heads=heads, max_new_tokens=256)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from spa.engine import decode as engine_decode
from spa.errors import ConfigError
from spa.views import count_positions

# model_type -> (the decoder layers' attribute on the base model, the attention module's attribute on a layer,
# whether the mask is added to the scores BEFORE they are divided by sqrt(head_dim)).
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("layers", "self_attn", False),  # DeepSeek-Coder, CodeLlama
    "codegen": ("h", "attn", True),  # CodeGen-Mono: its own attention, eager, mask before the scaling
}
ATTENTION_FUNCTIONS: tuple[str, ...] = ("eager", "sdpa")
Heads = dict[int, tuple[int, ...]]  # layer -> steered heads of that layer


def head_shape(config) -> tuple[int, int]:
    """(layers, attention heads per layer) of a model config."""
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def resolve_heads(config, heads: str | Mapping) -> Heads:
    """The steered heads of a model: ``"all"``, ``{"last_k_layers": k}`` (every head of the last k layers), or
    ``{layer: [head, ...]}`` (pastalib's head_config; layer keys may be strings, as in JSON)."""
    n_layers, n_heads = head_shape(config)
    if heads == "all":
        return {layer: tuple(range(n_heads)) for layer in range(n_layers)}
    if isinstance(heads, Mapping) and set(heads) == {"last_k_layers"}:
        k = heads["last_k_layers"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_layers:
            raise ConfigError(
                f"PASTA heads last_k_layers={k!r} is not a number of layers of this model (1..{n_layers}). Give an "
                f"integer, e.g. method.heads={{last_k_layers: {min(4, n_layers)}}}."
            )
        return {layer: tuple(range(n_heads)) for layer in range(n_layers - k, n_layers)}
    if not isinstance(heads, Mapping) or not heads:
        raise ConfigError(
            f"Unknown PASTA head set {heads!r}. Use 'all' (every head), {{last_k_layers: k}} (every head of the last k "
            "layers), a head profile written by scripts/pasta_profile.py, or a mapping {layer: [head, ...]}."
        )
    resolved: Heads = {}
    for layer, chosen in heads.items():
        try:
            index, picked = int(layer), tuple(sorted({int(h) for h in chosen}))
        except (TypeError, ValueError):
            index, picked = -1, ()
        if not 0 <= index < n_layers or not picked or not all(0 <= h < n_heads for h in picked):
            raise ConfigError(
                f"PASTA head set entry {layer!r}: {chosen!r} does not name heads of this model ({n_layers} layers of "
                f"{n_heads} heads, counted from 0). A head set made for another model does not fit: profile this one "
                "with scripts/pasta_profile.py, or use heads 'all' or {last_k_layers: k}."
            )
        resolved[index] = picked
    return dict(sorted(resolved.items()))


def _attention_modules(model, heads: Heads) -> dict[int, torch.nn.Module]:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"PASTA is implemented for {', '.join(ARCHITECTURES)} models (the paper's DeepSeek-Coder, CodeLlama and "
            f"CodeGen), not {model_type!r}. Use one of those, or another method (method=spa, cfg or cad)."
        )
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if model_type != "codegen" and implementation not in ATTENTION_FUNCTIONS:
        raise ConfigError(
            f"PASTA adds a bias to the attention mask, which attention={implementation!r} does not take. Load the "
            f"model with attn_implementation='sdpa' or 'eager' (model.attn_implementation=sdpa)."
        )
    layers_attribute, attention_attribute, _ = ARCHITECTURES[model_type]
    layers = getattr(model.base_model, layers_attribute)
    return {layer: getattr(layers[layer], attention_attribute) for layer in heads}


class Steering:
    """The steering of one batch of prompts: which of each prompt's keys get ``log(alpha)`` on which heads.

    ``prepare(rows, attention_mask)`` (``spa.decode``'s ``before_forward``) lays the scaled keys out for the next
    forward: ``rows`` holds the (prompt index, sample index) of each row, ``attention_mask`` the rows' mask over all
    columns so far. A row's real columns hold its prompt and then its generated tokens, in order (left padding and
    one view, as :func:`spa.decode` lays them out with omega = 1).
    """

    def __init__(self, model, emphasized_masks: Sequence[Sequence[bool]], alpha: float, heads: Mapping[int, Sequence[int]]):
        alpha = float(alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(
                f"PASTA alpha={alpha!r} must be a finite number > 0: log(alpha) is added to the attention scores of "
                "the keys outside the emphasized text. Use 0 < alpha < 1 to steer (the paper: 0.01); 1 is the plain model."
            )
        self.alpha = alpha
        self.heads = resolve_heads(model.config, heads)
        self.modules = _attention_modules(model, self.heads)
        self.n_heads = head_shape(model.config)[1]
        device = model.get_input_embeddings().weight.device
        masks = [list(map(bool, mask)) for mask in emphasized_masks]
        width = max(map(len, masks), default=1)
        # Per prompt and token: True where its key is scaled (a prompt token outside the emphasized text).
        self.outside = torch.tensor([[not e for e in mask] + [False] * (width - len(mask)) for mask in masks], dtype=torch.bool, device=device).reshape(len(masks), width)
        self.lengths = torch.tensor([len(mask) for mask in masks], device=device)
        self.scaled: torch.Tensor | None = None  # (rows, columns): the keys the next forward scales

    def prepare(self, rows: Sequence[tuple[int, int]], attention_mask: torch.Tensor) -> None:
        prompts = torch.tensor([prompt for prompt, _ in rows], device=self.outside.device)
        token = count_positions(attention_mask)  # each column's index in its row's sequence of real tokens
        outside = self.outside[prompts].gather(1, token.clamp(max=self.outside.shape[1] - 1))
        self.scaled = attention_mask.bool() & (token < self.lengths[prompts, None]) & outside

    def bias(self, layer: int, dtype: torch.dtype, factor: float) -> torch.Tensor:
        """(rows, heads, 1, columns): ``factor * log(alpha)`` on the scaled keys of the layer's selected heads."""
        selected = torch.zeros(self.n_heads, dtype=torch.float64, device=self.scaled.device)
        selected[list(self.heads[layer])] = factor * math.log(self.alpha)
        return (selected[None, :, None, None] * self.scaled[:, None, None, :]).to(dtype)

    def _pre_hook(self, layer: int, scaled_before_division: bool):
        def hook(module, args, kwargs):
            if self.scaled is None:
                raise RuntimeError("PASTA steering got a forward before prepare(rows, attention_mask) laid out its keys")
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mask = kwargs.get("attention_mask")
            rows, queries, columns = hidden.shape[0], hidden.shape[1], self.scaled.shape[1]
            floor = torch.finfo(hidden.dtype).min
            if mask is None:  # sdpa without padding: causal, the queries being the last columns
                causal = torch.ones(queries, columns, dtype=torch.bool, device=hidden.device).tril(columns - queries)
                mask = causal[None, None].expand(rows, 1, queries, columns)
            if mask.dtype == torch.bool:
                zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                mask = torch.where(mask, zero, zero + floor)
            factor = module.scale_attn if scaled_before_division else 1.0
            return args, {**kwargs, "attention_mask": mask + self.bias(layer, mask.dtype, factor)}

        return hook


@contextmanager
def steer(model, emphasized_masks: Sequence[Sequence[bool]], alpha: float, heads: Mapping[int, Sequence[int]] | str) -> Iterator[Steering]:
    """Steer ``model`` inside the block: yields the :class:`Steering`, whose ``prepare`` must run before each forward."""
    steering = Steering(model, emphasized_masks, alpha, heads)
    scaled_before_division = ARCHITECTURES[model.config.model_type][2]
    handles = [module.register_forward_pre_hook(steering._pre_hook(layer, scaled_before_division), with_kwargs=True)
               for layer, module in steering.modules.items()]
    try:
        yield steering
    finally:
        for handle in handles:
            handle.remove()


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    emphasized_masks: Sequence[Sequence[bool]],
    alpha: float,
    heads: Mapping[int, Sequence[int]] | str,
    max_new_tokens: int | Sequence[int],
    **kwargs,
) -> list[list[int]]:
    """Decode every prompt with PASTA and return the new ids of each, as :func:`spa.decode` does.

    ``emphasized_masks``: per prompt and token, True where it is emphasized (the anchored text); ``alpha`` scales
    the attention to every other prompt token on the selected ``heads`` (:func:`resolve_heads`). ``kwargs`` are
    :func:`spa.decode`'s (``eos_token_id``, ``batch_size``, stops, sampling); the model runs one view (omega = 1).
    """
    if len(emphasized_masks) != len(prompts) or any(len(m) != len(p) for m, p in zip(emphasized_masks, prompts)):
        raise ValueError("PASTA needs one emphasized mask per prompt, with one entry per prompt token")
    with steer(model, emphasized_masks, alpha, heads) as steering:
        return engine_decode(model, prompts, omega=1.0, max_new_tokens=max_new_tokens, before_forward=steering.prepare, **kwargs)
