"""Evaluate EvalPlus-format samples in the sandbox; writes eval_results.json next to the samples.

    python scripts/evaluate.py benchmark=humaneval samples=runs/x/samples.jsonl [n_workers=4]

Exit status 2 with a one-paragraph message for a user error (unknown benchmark, missing or
malformed samples file, unknown task id); see ``configs/evaluate.yaml`` for the options.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import hydra  # noqa: E402
from hydra.utils import to_absolute_path  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import MissingMandatoryValue  # noqa: E402

from eval.errors import ConfigError, HarnessError  # noqa: E402
from eval.evaluate import PHASES, Limits, evaluate_samples, load_samples, write_eval_results  # noqa: E402
from eval.sandbox import SandboxConfig  # noqa: E402

CONFIG_DIR = REPO_ROOT / "configs"


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        evaluate_from_config(cfg)
    except HarnessError as exc:
        _exit_with(exc)


def evaluate_from_config(cfg: DictConfig) -> Path:
    try:
        samples_path = Path(to_absolute_path(cfg.samples))
    except MissingMandatoryValue:
        raise ConfigError(
            "No samples file given. Pass samples=PATH, a JSONL file with one "
            '{"task_id": ..., "solution": ...} (or "completion") object per line.'
        ) from None
    executor = OmegaConf.to_container(cfg.executor, resolve=True)
    try:
        sandbox_config, limits = SandboxConfig(**executor["sandbox"]), Limits(**executor["limits"])
    except TypeError as exc:
        raise ConfigError(f"Invalid executor setting ({exc}); see configs/executor/default.yaml.") from None
    samples = load_samples(samples_path)
    started = time.monotonic()
    results = evaluate_samples(
        cfg.benchmark.name,
        samples,
        data_dir=to_absolute_path(cfg.data_dir) if cfg.data_dir else None,
        n_workers=cfg.n_workers,
        cache_dir=to_absolute_path(cfg.cache_dir) if cfg.cache_dir else None,
        progress=cfg.progress,
        sandbox_config=sandbox_config,
        limits=limits,
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


def check_benchmark_choice(argv: list[str]) -> None:
    """Hydra reports an unknown config-group option with exit status 1 and a multi-line message;
    checking it first gives the user the harness's one paragraph and status 2."""
    choices = sorted(path.stem for path in (CONFIG_DIR / "benchmark").glob("*.yaml"))
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "benchmark" and value not in choices:
            raise ConfigError(f"Unknown benchmark {value!r}. Choose benchmark={' or benchmark='.join(choices)}.")


def _exit_with(exc: HarnessError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    try:
        check_benchmark_choice(sys.argv[1:])
    except HarnessError as error:
        _exit_with(error)
    main()
