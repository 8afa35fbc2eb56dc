"""The settings that decide a cell's samples, as one typed object built from the run config.

A cell's fingerprint and the directory of its shared generation (``results/cells/<key>/``) are derived from
:class:`GenerationSettings` as a whole, so a setting added to any of its config sections (model, quantization,
protocol, spa, method, generation) changes them without anyone keeping a list. Only what provably does not
change a sample is left out (:data:`NOT_GENERATION`): names for tables, the paper's ω table (it is resolved into
``omega``), planning figures and speed knobs such as ``batch_size``, which the manifests record instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eval.store import REPO_ROOT

# Per config section, the keys that name, describe or speed up a run without changing its samples.
NOT_GENERATION: dict[str, frozenset[str]] = {
    "model": frozenset({"display_name", "paper_omega", "parameters_b"}),
    "spa": frozenset({"omega", "masking"}),  # resolved into GenerationSettings.omega and .masking
    "generation": frozenset({"batch_size"}),
    "attention": frozenset({"grad_batch_size"}),
}


def project_path(path: str | Path) -> Path:
    """``path`` as an absolute path; a relative one is taken from the project root, wherever the command runs."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def section(cfg: DictConfig, name: str) -> dict:
    """Config section ``name``, resolved, without the keys that do not change a sample."""
    values = OmegaConf.to_container(cfg[name], resolve=True)
    return {k: v for k, v in values.items() if k not in NOT_GENERATION.get(name, ())}


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the samples of a cell; equal settings mean the same generation."""

    model: Mapping[str, object]
    quantization: Mapping[str, object]
    benchmark: str
    dataset_sha256: str
    authors_file_sha256: str | None  # protocol=authors reads its prompts from the authors' task file
    protocol: Mapping[str, object]
    anchor: str  # "none" for the plain model and for second views that ignore the anchors
    omega: float  # the engine's weight on the full prompt (SPA's omega, CFG's guidance_scale, 1 + CAD's alpha)
    masking: str  # how the second view is built (resolved: never the protocol's implicit default)
    method: Mapping[str, object]  # name and strength (and CFG's negative)
    spa: Mapping[str, object]
    generation: Mapping[str, object]
    attention: Mapping[str, object] | None = None  # attention measurements only

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def key(self) -> str:
        """The generation's directory under ``results/cells/``: readable levels, then the fingerprint."""
        return f"{self.model['name']}/{self.benchmark}/{self.protocol['name']}/{self.fingerprint}"
