"""What every entry point in scripts/ shares: command-line checks before Hydra, and exit code 2 on bad input.

Hydra reports an unknown config-group option (``model=gpt5``) or key (``omega=1.3``) with a traceback-like
message and exit code 1, and adds an unknown ``+key=value`` that nothing then reads; the harness promises one
paragraph naming the value and the fix, and exit code 2, so the command line is checked first. Ctrl-C ends a
run with one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from eval.errors import HarnessError, Interrupted
from eval.experiments.grouping import check_grouping
from eval.experiments.settings import project_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("model", "benchmark", "anchor", "protocol", "method", "spa", "generation", "quantization", "paths", "executor",
                  "experiment")
INTERRUPTED = "interrupted: every finished batch is kept; rerun the same command to resume."
# hydra.sweep.dir uses it, so that sweep logs land in the project's results/ wherever the command runs.
OmegaConf.register_new_resolver("project_path", lambda path: str(project_path(path)), replace=True)


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


def _is_setting(key: str) -> bool:
    """Whether an override's key names a config value (``limit``, ``spa.omega``), not a group or Hydra's own."""
    key = key.lstrip("+")
    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key:
        return False
    return "." in key or not (CONFIG_DIR / key).is_dir()


def _keys(node, prefix: str = "") -> list[str]:
    return [name for k, v in node.items() for name in ([f"{prefix}{k}"] + (_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else []))]


def check_unknown_keys(config_name: str, argv: list[str]) -> None:
    """Raise for a ``key=value`` or ``+key=value`` that no key of config ``config_name`` (with the command line's
    group choices) holds: Hydra refuses the first with a raw struct error, and adds the second for nothing to read."""
    arguments = [a for a in argv if not a.startswith("-") and "=" in a]
    settings = [a for a in arguments if not a.startswith("~") and "@" not in a and _is_setting(a.partition("=")[0])]
    if not settings:
        return
    from hydra import compose, initialize_config_dir

    choices = [f"{key}={(_choices(value) or [value])[0]}" for key, _, value in (a.partition("=") for a in arguments)
               if not key.startswith("~") and not key.lstrip("+").startswith("hydra") and not _is_setting(key)]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            config = OmegaConf.to_container(compose(config_name, overrides=choices))
    except Exception:  # noqa: BLE001 - a composition error is Hydra's to report, with its own message
        return
    known = _keys(config)
    for argument in settings:
        key = argument.partition("=")[0].lstrip("+")
        if key in known:
            continue
        leaf = key.rpartition(".")[2]
        near = [k for k in known if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(key, known, n=3)
        listed = ", ".join(f"{k}.*" if isinstance(v, dict) else k for k, v in config.items())
        hint = f" Did you mean {' or '.join(near)}?" if near else ""
        raise HarnessError(
            f"Unknown setting {key!r} (from {argument!r}): no key of configs/{config_name}.yaml holds it, so the run "
            f"would ignore it.{hint} Known keys: {listed} (`--cfg job` prints them all with their values)."
        )


class exit_on_harness_error(contextlib.ContextDecorator):
    """Every entry point's exit on bad input: ``with exit_on_harness_error():`` around an argparse script's main (and
    in ``run_main``), or ``@exit_on_harness_error()`` under ``@hydra.main`` on a task function. A HarnessError exits
    with its ``exit_code`` (2) and its message (Hydra would print a trace, exit 1); Ctrl-C exits 130 with the one line
    ``ctrl_c`` (None: a plain KeyboardInterrupt, for a command with nothing to resume). A class, not a generator:
    submitit pickles the decorated task for its jobs."""

    def __init__(self, ctrl_c: str | None = INTERRUPTED) -> None:
        self.ctrl_c = ctrl_c

    def __enter__(self) -> "exit_on_harness_error":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, Interrupted):
            print(error, file=sys.stderr)
            sys.exit(error.exit_code)
        if isinstance(error, HarnessError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        if isinstance(error, KeyboardInterrupt) and self.ctrl_c is not None:  # in a task, or in Hydra's launcher
            print(self.ctrl_c, file=sys.stderr)
            sys.exit(Interrupted.exit_code)


def run_main(hydra_main: Callable[[], None], config_name: str | None = None) -> None:
    """Check the command line's config-group choices (and, given the main's ``config_name``, its keys), then run
    the Hydra main."""
    with exit_on_harness_error():
        check_group_overrides(sys.argv[1:])
        for argument in sys.argv[1:]:  # the sweeper groups the jobs before any job could report it
            if argument.startswith("grouping="):
                check_grouping(argument.partition("=")[2])
        if config_name:
            check_unknown_keys(config_name, sys.argv[1:])
        hydra_main()
