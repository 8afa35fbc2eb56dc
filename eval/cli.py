"""What every entry point in scripts/ shares: config-group checks before Hydra, and exit code 2 on bad input.

Hydra reports an unknown config-group option (``model=gpt5``) with a traceback-like message and exit
code 1; the harness promises one paragraph naming the value and the fix, and exit code 2, so the
group choices on the command line are checked first.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eval.errors import HarnessError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("model", "benchmark", "anchor", "protocol", "method", "spa", "generation", "quantization", "paths", "executor",
                  "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _choices(value: str) -> list[str]:
    """The values of one override (a comma-separated sweep list); none for Hydra's sweep functions."""
    return [v.strip() for v in value.split(",")] if not value.startswith(("choice(", "range(")) else []


def check_group_overrides(argv: list[str]) -> None:
    """Raise for ``group=value`` arguments whose value (or any value of a sweep list) has no config, and for a
    ``method.<key>=`` setting that a chosen method does not have (Hydra would report it with a traceback; an
    experiment preset may choose the method itself, so with one and no ``method=`` that check is Hydra's)."""
    methods = ["spa"]
    for argument in argv:
        key, sep, value = argument.partition("=")
        group = key.lstrip("+~")
        if not sep or group not in CHECKED_GROUPS:
            continue
        options = group_options(group)
        for choice in _choices(value):
            if choice not in options:
                raise HarnessError(
                    f"Unknown {group} {choice!r} (from {argument!r}). Available {group} configs: "
                    f"{', '.join(options)}. Add configs/{group}/{choice}.yaml to define a new one."
                )
        if group == "method":
            methods = _choices(value) or methods
        elif group == "experiment" and not any(a.partition("=")[0].lstrip("+~") == "method" for a in argv):
            methods = []
    for argument in argv:
        key, sep, _ = argument.partition("=")
        if not sep or not key.startswith("method.") or key.startswith(("+", "~")):
            continue
        setting = key.removeprefix("method.")
        for method in methods:
            known = OmegaConf.load(CONFIG_DIR / "method" / f"{method}.yaml")
            if setting not in known:
                raise HarnessError(
                    f"method={method} has no setting {key!r} (from {argument!r}); its settings are "
                    f"{', '.join(f'method.{k}' for k in known)}. Each method has its own strength: spa.omega "
                    "(method=spa), method.guidance_scale (method=cfg), method.alpha (method=cad); sweep one "
                    "method at a time, e.g. -m method=cfg method.guidance_scale=1.25,1.5."
                )


def exit_on_harness_error(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """Wrap a Hydra task function: a HarnessError exits 2 with its message (Hydra would print a trace, exit 1)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except HarnessError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)

    return wrapper


def run_main(hydra_main: Callable[[], None]) -> None:
    """Check the command line's config-group choices, then run the Hydra main."""
    try:
        check_group_overrides(sys.argv[1:])
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    hydra_main()
