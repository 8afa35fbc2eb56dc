"""Group jobs: a sweep's cells of one model, benchmark and protocol run as one job.

Hydra's sweeper makes one job per point of the sweep (one cell). With ``grouping=model_benchmark`` (the default,
configs/run.yaml) the points that differ only in what a cell varies (:data:`CELL_KEYS`: the anchor and the
strength) become one job, whose ``cells=`` override lists each cell's own overrides; that job loads the model once
and decodes all its cells together (:func:`eval.runner.run_group`). ``grouping=cell`` keeps one job per cell.
Everything else (the model, the benchmark, the protocol, ``shard``) tells jobs apart, so shards stay separate jobs.
"""

from __future__ import annotations

from omegaconf import DictConfig

from eval.errors import ConfigError

CELL_KEYS = frozenset({"anchor", "spa.omega", "method.guidance_scale", "method.alpha"})
GROUPINGS = ("model_benchmark", "cell")


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_grouping(grouping: str) -> None:
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping={grouping!r} is not one of {', '.join(GROUPINGS)}: model_benchmark runs the cells of "
                          "one model, benchmark and protocol as one job (the default), cell runs one job per cell.")


def job_key(cell: list[str], grouping: str) -> tuple[str, ...]:
    """The overrides that name the job a cell (its overrides) runs in: the cell's own, or its group's."""
    check_grouping(grouping)
    return tuple(cell) if grouping == "cell" else tuple(o for o in cell if _key(o) not in CELL_KEYS)


def grouping_text(grouping: str) -> str:
    return "one per cell" if grouping == "cell" else "one per model, benchmark and protocol"


def group_jobs(jobs: list[list[str]], grouping: str) -> list[list[str]]:
    """The jobs to launch for the sweep's per-cell ``jobs`` (each a list of overrides), in their order."""
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for job in jobs:
        groups.setdefault(job_key(job, grouping), []).append([o for o in job if _key(o) in CELL_KEYS])
    if grouping == "cell":
        return [list(shared) for shared in groups]
    return [[*shared, "cells=[" + ",".join("[" + ",".join(map(_quoted, cell)) + "]" for cell in cells) + "]"]
            for shared, cells in groups.items()]


def cell_configs(cfg: DictConfig, config_name: str = "run") -> list[DictConfig]:
    """The config of each cell of a group job: the job's overrides plus the cell's own, composed as Hydra would."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    common = [o for o in HydraConfig.get().overrides.task if _key(o) != "cells"]
    return [compose(config_name, overrides=[*common, *cell]) for cell in cfg.cells]
