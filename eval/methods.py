"""Decoding methods on the one engine: SPA and the baselines beside it (README "Methods").

Every method but PASTA decodes with ``logits = c * f(x) + (1 - c) * f(x')`` through :func:`spa.decode` (both views of a
batch in one forward per step). They differ only in the second view ``x'`` and in how their own strength sets
``c``, the weight on the full prompt ``x``:

======  ==============================  =======  ==========================================================
method  strength                        c        second view x'
======  ==============================  =======  ==========================================================
spa     ``spa.omega`` = omega           omega    the protocol's masked view (anchored text masked)
cfg     ``method.guidance_scale`` = g   g        the last prompt token (``negative: last_token``, what
                                                 transformers uses without a negative prompt), or the
                                                 protocol's masked view (``negative: masked``)
cad     ``method.alpha`` = a            1 + a    the prompt with the anchored text deleted
pasta   ``method.alpha`` = a            (a)      none: one view, whose attention to the prompt outside the
                                                 anchored text is scaled by a on ``method.heads`` (spa.pasta)
======  ==============================  =======  ==========================================================

transformers' CFG (``UnbatchedClassifierFreeGuidanceLogitsProcessor``) combines log-softmaxed scores,
``g * log p(x) + (1 - g) * log p(x')``; CAD's code combines raw logits (below). Since
``log_softmax(l) = l - logsumexp(l)``, the two forms differ by ONE number per row,
``g * logsumexp(l) + (1 - g) * logsumexp(l')``, and adding a number to every score of a row changes no token
choice: not the argmax, not softmax at any temperature, not top-k or top-p. The engine's raw-logit
combination (in float32) is therefore each method exactly; tests/test_engine.py checks CFG token for token
against transformers' own ``generate(guidance_scale=..., negative_prompt_ids=...)``.

c = 1 is the plain model whatever the method: such a cell IS the plain model's cell (``<protocol>/none/omega=1.0``),
computed once and shared by every method. PASTA has no second view and no c; its cell's weight (``omega`` in its
manifest, the key of its strength grid in the tables) is alpha itself, which is 1 for the plain model too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from eval.errors import ConfigError
from eval.experiments.settings import project_path


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: its name (config option and directory level), its strength and how it sets c."""

    name: str
    label: str
    parameter: str  # the strength's key: spa.omega for SPA, method.<parameter> for the others
    offset: float  # c = strength + offset
    second_view: str  # what x' is, for tables
    source: str

    def coefficient(self, strength: float) -> float:
        """c, the engine's ``omega``, for a strength of this method."""
        return float(strength) + self.offset

    def strength(self, coefficient: float) -> float:
        """This method's strength for the engine's c."""
        return float(coefficient) - self.offset


SPA = MethodSpec("spa", "SPA", "omega", 0.0, "anchored text masked", "Tian & Zhang, arXiv:2408.09121")
CFG = MethodSpec("cfg", "CFG", "guidance_scale", 0.0, "negative prompt",
                 "Sanchez et al. 2023, arXiv:2306.17806; transformers' guidance_scale / negative_prompt_ids")
# Shi et al. 2023 ("Trusting Your Evidence", arXiv:2305.14739): softmax[(1 + a) logit(y | c, x) - a logit(y | x)].
# Their code (github.com/xhan77/context-aware-decoding, group_decode_fileio.py, decode()) combines RAW logits:
# each process scales its model's `outputs.logits[:, -1:, :]` by its assigned weight (1 + a, or -a) and the
# weighted logits are summed by all_reduce; their runs use weights 1.5_-0.5 (a = 0.5, CNN-DM summarization,
# top-p 0.9) and 2_-1 (a = 1, NQ-Swap knowledge conflicts, greedy).
CAD = MethodSpec("cad", "CAD", "alpha", 1.0, "anchored text deleted",
                 "Shi et al. 2023, arXiv:2305.14739; github.com/xhan77/context-aware-decoding")
# Zhang et al. 2023 ("Tell Your Model Where to Attend", arXiv:2311.02262; github.com/QingruZhang/PASTA, pastalib):
# on the selected heads, log(alpha) is added to the attention scores of the prompt tokens outside the emphasized
# (here: anchored) text (pastalib's scale_position="exclude"; the paper's alpha = 0.01). One view: spa.pasta.
PASTA = MethodSpec("pasta", "PASTA", "alpha", 0.0, "NL emphasized",
                   "Zhang et al. 2023, arXiv:2311.02262; github.com/QingruZhang/PASTA")
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (SPA, CFG, CAD, PASTA)}
CFG_NEGATIVES: tuple[str, ...] = ("last_token", "masked")
HEAD_PROFILE_FORMAT = "spa-harness/pasta-heads/1"  # what scripts/pasta_profile.py writes
# The model settings a head profile must share with the model it steers.
PROFILE_MODEL_KEYS: tuple[str, ...] = ("name", "hf_id", "revision")
# SPA's settings (configs/spa/) at their defaults: another method must leave them there.
SPA_DEFAULTS: dict[str, object] = {"omega": "paper", "masking": None, "modulated_by_prob": False, "mask_token": None}


@dataclass(frozen=True)
class Method:
    """The method of one cell, with its strength (and CFG's negative prompt)."""

    spec: MethodSpec
    strength: float
    negative: str | None = None  # cfg: last_token | masked
    heads: str | dict | None = None  # pasta: "all", {"last_k_layers": k} or {layer: [head, ...]} (spa.pasta.resolve_heads)
    heads_profile: str | None = None  # pasta: the head profile file the heads come from

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def omega(self) -> float:
        """c, the weight on the full prompt that the engine gets as ``omega``."""
        return self.spec.coefficient(self.strength)

    @property
    def is_plain(self) -> bool:
        return self.omega == 1.0

    @property
    def uses_anchor(self) -> bool:
        """Whether the second view depends on what is anchored (CFG's last-token negative does not)."""
        return not (self.spec is CFG and self.negative == "last_token")

    def cell_anchor(self, condition: str) -> str:
        """The anchor level of this method's cell: ``none`` for the plain model and for a second view that
        ignores the anchors (whatever is anchored, it is the same cell); else the anchor condition."""
        if self.is_plain or not self.uses_anchor:
            return "none"
        if condition == "none" and self.spec is PASTA:
            raise ConfigError(
                f"method={self.describe()} with anchor=none has no text to emphasize: PASTA scales the attention to the "
                "prompt outside the anchored text. Anchor the text it should emphasize (anchor=nl)."
            )
        if condition == "none" and self.spec is not SPA:
            raise ConfigError(
                f"method={self.describe()} with anchor=none has nothing to take away from the prompt: its second view "
                "would be the prompt itself, i.e. the plain model at any strength. Anchor the text it should act "
                f"on (anchor=nl){' or use method.negative=last_token' if self.spec is CFG else ''}."
            )
        return condition

    def protocol_masking(self, spa_masking: str | None) -> str | None:
        """The masking the protocol builds the second view with (None: the protocol's own)."""
        return "delete" if self.spec is CAD else spa_masking

    def second_view(self, inputs, tokenizer):
        """``inputs`` (eval.benchmarks.protocols.ModelInputs) with this method's second view."""
        if self.uses_anchor:
            return inputs
        last = inputs.input_ids[-1:]
        return dataclasses.replace(inputs, masked_input_ids=last, masked_prompt_text=tokenizer.decode(last))

    def settings(self) -> dict[str, object]:
        """What identifies the method in a cell's configuration (its fingerprint and manifest)."""
        negative = {"negative": self.negative} if self.spec is CFG else {}
        heads = {"heads": self.heads, **({"heads_profile": self.heads_profile} if self.heads_profile else {})} if self.spec is PASTA else {}
        return {"name": self.name, self.spec.parameter: self.strength, **negative, **heads}

    def describe(self) -> str:
        details = f", method.negative={self.negative}" if self.spec is CFG else ""
        if self.spec is PASTA:
            details = f", method.heads={self.heads_profile or json.dumps(self.heads)}"
        return f"{self.name} ({self.spec.parameter}={self.strength:g}{details})"


def _finite(value: object, key: str, example: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}. Example: {key}={example}.")
    return number


def _unused_spa_setting(method: Method, spa: Mapping[str, object]) -> str | None:
    """The first of SPA's settings that was changed but has no effect on ``method`` (None if none)."""
    used = {"masking", "mask_token"} if method.spec is CFG and method.negative == "masked" else set()
    for key, default in SPA_DEFAULTS.items():
        value = spa.get(key, default)
        if key not in used and (str(value).strip().lower() if key == "omega" else value) != default:
            return key
    return None


def load_head_profile(path: str | Path, model: Mapping[str, object]) -> dict:
    """The head set of a profile written by scripts/pasta_profile.py (a relative ``path`` is taken from the project
    root), checked to be ``model``'s (its config)."""
    try:
        profile = json.loads(project_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"PASTA head profile {str(path)!r} does not exist. Profile the model first (python scripts/pasta_profile.py "
            f"model={model.get('name')}), or steer without a profile: method.heads=all or method.heads={{last_k_layers: 4}}."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"PASTA head profile {str(path)!r} is unreadable ({error}); write it again with scripts/pasta_profile.py.") from None
    if not isinstance(profile, dict) or profile.get("format") != HEAD_PROFILE_FORMAT or not isinstance(profile.get("heads"), dict):
        raise ConfigError(
            f"{str(path)!r} is not a PASTA head profile of this harness (format {HEAD_PROFILE_FORMAT!r}, with the model "
            "it was made for); write one with scripts/pasta_profile.py, or use method.heads=all."
        )
    made_for = {key: (profile.get("model") or {}).get(key) for key in PROFILE_MODEL_KEYS}
    wanted = {key: model.get(key) for key in PROFILE_MODEL_KEYS}
    if made_for != wanted:
        raise ConfigError(
            f"PASTA head profile {str(path)!r} was made for model {made_for}, not for this run's {wanted}: heads are "
            f"chosen per model. Profile this one (python scripts/pasta_profile.py model={model.get('name')}) and point "
            "method.heads at its file."
        )
    return profile["heads"]


def _pasta_heads(heads: object, model: Mapping[str, object]) -> tuple[str | dict, str | None]:
    """(head set, profile path) of ``method.heads``: "all", {last_k_layers: k} (checked against the model when it is
    loaded) or a profile's path."""
    if heads == "all":
        return heads, None
    if isinstance(heads, Mapping) and set(heads) == {"last_k_layers"}:
        k = heads["last_k_layers"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"method.heads.last_k_layers={k!r} must be a number of layers >= 1, e.g. method.heads={{last_k_layers: 4}}.")
        return dict(heads), None
    if isinstance(heads, str) and heads.endswith(".json"):
        return load_head_profile(heads, model), heads
    raise ConfigError(
        f"method.heads={heads!r} is not a PASTA head set. Use all (every head), {{last_k_layers: k}} (every head of "
        "the last k layers) or the path of a head profile (.json) written by scripts/pasta_profile.py."
    )


def resolve_method(method: Mapping[str, object], spa: Mapping[str, object], spa_omega: Callable[[], float],
                   model: Mapping[str, object] | None = None) -> Method:
    """The method of a run config (``cfg.method``, ``cfg.spa``); ``spa_omega()`` resolves SPA's omega; ``model`` (the
    model's config) is what a PASTA head profile must have been made for.

    Raises a one-paragraph ``ConfigError`` for an unknown method, a setting the method does not have, a
    strength that is not a number, or one of SPA's settings changed for another method (it would be ignored).
    """
    name = method.get("name")
    spec = METHODS.get(name)  # type: ignore[arg-type]
    if spec is None:
        raise ConfigError(
            f"Unknown method {name!r}. Use method=spa (the default: Selective Prompt Anchoring, strength spa.omega), "
            "method=cfg (classifier-free guidance, method.guidance_scale), method=cad (context-aware decoding, "
            "method.alpha) or method=pasta (attention steering, method.alpha, method.heads); configs/method/ holds one "
            "file per method."
        )
    own = ({"name"} | ({spec.parameter} if spec is not SPA else set()) | ({"negative"} if spec is CFG else set())
           | ({"heads"} if spec is PASTA else set()))
    unknown = sorted(set(method) - own)
    if unknown:
        raise ConfigError(
            f"method={name} has no setting {', '.join(f'method.{k}' for k in unknown)}; its settings are "
            f"{', '.join(f'method.{k}' for k in sorted(own))}. Each method has its own strength: spa.omega (SPA), "
            "method.guidance_scale (CFG), method.alpha (CAD, PASTA)."
        )
    if spec is SPA:
        return Method(SPA, spa_omega())
    strength = _finite(method.get(spec.parameter), f"method.{spec.parameter}", {CFG: "1.5", PASTA: "0.01"}.get(spec, "0.5"))
    negative = heads = profile = None
    if spec is PASTA:
        if strength <= 0:
            raise ConfigError(
                f"method.alpha={strength:g} must be > 0 for PASTA: log(alpha) is added to the attention scores outside the "
                "anchored text. Use 0 < alpha < 1 to steer (the paper: method.alpha=0.01); 1 is the plain model."
            )
        heads, profile = _pasta_heads(method.get("heads"), model or {})
    if spec is CFG:
        negative = method.get("negative")
        if negative not in CFG_NEGATIVES:
            raise ConfigError(
                f"method.negative={negative!r} is not a CFG negative prompt. Use last_token (the last prompt token, "
                "what transformers uses when no negative prompt is given) or masked (the protocol's masked view of "
                "the anchored text, which makes CFG the same decoding as SPA at omega = guidance_scale)."
            )
    resolved = Method(spec, strength, negative, heads, profile)
    key = _unused_spa_setting(resolved, spa)
    if key is not None:
        view = {"last prompt token": "whose second view is the last prompt token",
                PASTA.second_view: "which decodes one view, the anchored text emphasized"}
        what = view.get(spec.second_view if resolved.uses_anchor else "last prompt token", f"whose second view is the {spec.second_view}")
        raise ConfigError(
            f"spa.{key}={spa.get(key)!r} is a setting of SPA and has no effect with method={resolved.describe()}, {what}. "
            f"Remove spa.{key} (method={name}'s strength is method.{spec.parameter}), or use method=spa."
        )
    return resolved


def plain() -> Method:
    """The plain model, as the cell every method shares: SPA at omega = 1."""
    return Method(SPA, 1.0)
