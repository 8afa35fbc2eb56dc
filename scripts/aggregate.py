"""Rebuild the paper's Tables 1-3 and Figures 2-4 from finished runs, beside the paper's numbers.

    python scripts/aggregate.py [runs_dir=results/runs] [out_dir=results] [what=all|tables|figures]
                                [cv_folds=5] [seed=0]

Tables go to <out_dir>/tables/ (CSV, Markdown, LaTeX) and are printed; every row names its protocol
(evalplus, authors), and results of different protocols are never paired or pooled. Figures go to
<out_dir>/figures/ (PNG, PDF), one set per protocol: <figure>-<protocol>.png. Notes on missing cells
and skipped figures go to stderr. Relative paths are taken from the project root, wherever the command runs.
Bad input exits with status 2 and a one-paragraph message, before anything is written. See docs/aggregation.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from eval.cli import exit_on_harness_error
from eval.experiments.settings import project_path
from eval.report import PAPER_DIR, Settings, aggregate, write_outputs


@hydra.main(config_path="../configs", config_name="aggregate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = project_path(cfg.out_dir)
    with exit_on_harness_error(ctrl_c=None):  # writes nothing until the end: nothing to resume
        outputs = aggregate(
            runs_dir=project_path(cfg.runs_dir),
            out_dir=out_dir,
            what=str(cfg.what),
            settings=Settings.from_config(OmegaConf.to_container(cfg)),
            paper_dir=project_path(cfg.paper_dir) if cfg.paper_dir else PAPER_DIR,
        )
        write_outputs(outputs.files)
    for text in outputs.printed:
        print(text)
    for note in outputs.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"Wrote {len(outputs.files)} files under {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
