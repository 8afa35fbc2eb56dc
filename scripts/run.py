"""Run SPA cells: generate with the SPA engine, evaluate in the sandbox, store under results/runs/.

    python scripts/run.py model=deepseek-coder-6.7b-instruct benchmark=humaneval anchor=nl spa.omega=1.28
    python scripts/run.py -m +experiment=omega_sweep hydra/launcher=slurm   # a sweep, one SLURM job per model and benchmark
    python scripts/run.py -m +experiment=omega_sweep grouping=cell           # one job per cell
    python scripts/run.py -m +experiment=omega_sweep shards=4 shard=0,1,2,3  # each job's tasks split among 4 jobs

Every cell resumes where it stopped; see README "Running experiments" and "Group jobs and shards".
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eval.cli import exit_on_harness_error, run_main
from eval.experiments.grouping import cell_configs
from eval.runner import run_cell, run_group


@hydra.main(config_path="../configs", config_name="run", version_base="1.3")
@exit_on_harness_error()
def main(cfg: DictConfig) -> None:
    if cfg.cells:
        run_group(cell_configs(cfg))
    else:
        run_cell(cfg)


if __name__ == "__main__":
    run_main(main, "run")
