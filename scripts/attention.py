"""Measure attention dilution: the share of attention on the prompt per generated token (paper Figures 2-3).

    python scripts/attention.py model=deepseek-coder-1.3b-instruct benchmark=humaneval spa.omega=1.0
    python scripts/attention.py -m +experiment=attention      # the paper's five models, omega 1 and SPA's

Writes results/runs/attention/<model>/<benchmark>/<protocol>/omega=<omega>/attention.jsonl and a manifest;
resumable like scripts/run.py. `scripts/aggregate.py` draws the figures.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eval.cli import exit_on_harness_error, run_main
from eval.runner import run_attention_cell


@hydra.main(config_path="../configs", config_name="attention", version_base="1.3")
@exit_on_harness_error()
def main(cfg: DictConfig) -> None:
    run_attention_cell(cfg)


if __name__ == "__main__":
    run_main(main, "attention")
