"""Evaluate the cells under a runs dir whose samples are all generated but not evaluated yet: sharded cells whose
last shard was killed, or cells generated with evaluate=false. Each is evaluated once, under its lock.

    python scripts/evaluate_cells.py results/runs              # every such cell
    python scripts/evaluate_cells.py results/runs/omega_sweep --dry-run

Cells still missing tasks are listed with how many; rerun their shards (the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from eval.cli import exit_on_harness_error
from eval.errors import HarnessError
from eval.store import Cell, read_json


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="results/runs, or any folder below it")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, evaluate nothing")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        raise HarnessError(f"{args.runs_dir} is not a folder. Give the runs dir (results/runs) or a folder below it.")
    from eval.runner import finish_cell, plan_cell

    ready = 0
    for manifest_path in sorted(args.runs_dir.rglob("manifest.json")):
        manifest = read_json(manifest_path)
        if manifest.get("status") not in ("incomplete", "generated") or "config" not in manifest:
            continue  # complete, or an attention cell's
        cfg = OmegaConf.create(manifest["config"])
        cfg.evaluate = True
        plan = plan_cell(cfg)
        with Cell(plan.generation_path, plan.settings.fingerprint) as generation:  # shards may still be appending
            have = {r["task_id"] for r in generation.load_records()}
        missing = len(set(manifest["task_ids"]) - have)
        if missing:
            print(f"missing {missing} of {len(manifest['task_ids'])} tasks: {plan.path}")
            continue
        ready += 1
        print(f"to evaluate: {plan.path}")
        if not args.dry_run:
            finish_cell(cfg, plan, list(manifest["task_ids"]))
    print(f"{ready} cells to evaluate" + (" (dry run: nothing evaluated)" if args.dry_run else ", evaluated"))


if __name__ == "__main__":
    with exit_on_harness_error(ctrl_c=None):
        main(sys.argv[1:])
