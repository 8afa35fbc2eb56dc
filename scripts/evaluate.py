"""Evaluate EvalPlus-format samples in the sandbox; writes eval_results.json next to the samples.

    python scripts/evaluate.py benchmark=humaneval samples=runs/x/samples.jsonl [n_workers=4]

Exit status 2 with a one-paragraph message for a user error (unknown benchmark, missing or
malformed samples file, unknown task id); see ``configs/evaluate.yaml`` for the options.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from eval.cli import exit_on_harness_error, run_main
from eval.errors import ConfigError
from eval.experiments.settings import project_path
from eval.execution.evaluate import PHASES, evaluate_samples, executor_settings, load_samples, write_eval_results


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
@exit_on_harness_error()
def main(cfg: DictConfig) -> None:
    evaluate_from_config(cfg)


def evaluate_from_config(cfg: DictConfig) -> Path:
    try:
        samples_path = Path(to_absolute_path(cfg.samples))  # the user's file: from where the command runs
    except MissingMandatoryValue:
        raise ConfigError(
            "No samples file given. Pass samples=PATH, a JSONL file with one "
            '{"task_id": ..., "solution": ...} (or "completion") object per line.'
        ) from None
    sandbox_config, limits = executor_settings(OmegaConf.to_container(cfg.executor, resolve=True))
    samples = load_samples(samples_path)
    started = time.monotonic()
    results = evaluate_samples(
        cfg.benchmark.name,
        samples,
        data_dir=project_path(cfg.data_dir) if cfg.data_dir else None,
        n_workers=cfg.n_workers,
        cache_dir=project_path(cfg.cache_dir) if cfg.cache_dir else None,
        progress=cfg.progress,
        sandbox_config=sandbox_config,
        limits=limits,
        dataset_version=cfg.dataset_version,
    )
    out = samples_path.parent / "eval_results.json"
    write_eval_results(out, results)
    print(f"{results['benchmark']}: {results['n_samples']} samples of {results['n_tasks']} tasks in {time.monotonic() - started:.1f}s")
    print(f"pass@1  base {results['pass@1']['base']:.4f}  plus {results['pass@1']['plus']:.4f}")
    for phase in PHASES:
        print(f"{phase:>5}: " + ", ".join(f"{status} {n}" for status, n in results["status_counts"][phase].items()))
    for note in results["protections"]["degraded"]:
        print(f"warning: sandbox degraded: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main)
