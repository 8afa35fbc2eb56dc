"""Plan sweeps before spending GPU time: jobs, cells, generations, what is already done, GPU-hours per model.

    python scripts/plan.py +experiment=omega_sweep                              # one preset
    python scripts/plan.py protocol=authors +experiment=omega_sweep +experiment=anchor_ablation   # sweeps in order
    python scripts/plan.py -m model=tiny spa.omega=1.0,1.3 anchor=nl,nl+test     # what `run.py -m ...` would run
    python scripts/plan.py --config-name attention +experiment=attention         # scripts/attention.py's sweeps

Takes run.py's arguments and config (configs/run.yaml); each ``+experiment=`` is one sweep, planned in the order
given, with the other arguments applied to all. Nothing is generated or written. See README "Plan before spending".
"""

from __future__ import annotations

import sys

from eval.cli import check_group_overrides, check_unknown_keys, exit_on_harness_error
from eval.experiments.plan import plan, render


def main(argv: list[str]) -> None:
    primary = "run"
    if "--config-name" in argv:
        index = argv.index("--config-name")
        primary = argv[index + 1]
        argv = argv[:index] + argv[index + 2:]
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    check_group_overrides(overrides)
    check_unknown_keys(primary, overrides)
    experiments = [a for a in overrides if a.startswith("+experiment=")]
    common = [a for a in overrides if a not in experiments]
    models, lines, throughput = plan([common + [e] for e in experiments] or [common], primary)
    print(render(models, lines, throughput))


if __name__ == "__main__":
    with exit_on_harness_error(ctrl_c=None):
        main(sys.argv[1:])
