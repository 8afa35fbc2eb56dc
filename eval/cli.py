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

from omegaconf import DictConfig

from eval.errors import HarnessError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("model", "benchmark", "anchor", "protocol", "spa", "generation", "quantization", "paths", "executor", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """Raise for ``group=value`` arguments whose value (or any value of a sweep list) has no config."""
    for argument in argv:
        key, sep, value = argument.partition("=")
        group = key.lstrip("+~")
        if not sep or group not in CHECKED_GROUPS:
            continue
        choices = [v.strip() for v in value.split(",")] if not value.startswith(("choice(", "range(")) else []
        options = group_options(group)
        for choice in choices:
            if choice not in options:
                raise HarnessError(
                    f"Unknown {group} {choice!r} (from {argument!r}). Available {group} configs: "
                    f"{', '.join(options)}. Add configs/{group}/{choice}.yaml to define a new one."
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
