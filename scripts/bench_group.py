"""Group jobs against one cell at a time: a 12-omega, 2-anchor group (omega_sweep's omega grid, NL and NL+Test
anchored; omega = 1 is one cell for both) on a subset of one benchmark, run once as one group job
(``eval.runner.run_group``: rows of every cell in the same batches, identical views prefilled once) and once cell by
cell (``run_cell``), in one process on the offline tiny model, each into its own fresh results tree. Reports both wall
times, their ratio, and whether every cell's samples are identical. Generation only (evaluate=false); the model is
built once, so the ratio is decoding alone.

    python scripts/bench_group.py                       # make bench -> results/bench/group.json
    python scripts/bench_group.py --limit 2 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from eval.cli import CONFIG_DIR  # noqa: E402
from eval.runner import load, run_cell, run_group  # noqa: E402

OMEGAS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.28, 1.3, 1.35, 1.4, 1.5, 1.6)  # configs/experiment/omega_sweep.yaml
ANCHORS = ("nl", "nl+test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="humaneval")
    parser.add_argument("--limit", type=int, default=4, help="tasks of the benchmark (its first N)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench" / "group.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        def configs(tree: str) -> list:
            return [compose("run", overrides=[f"paths.results_dir={scratch}/{tree}", f"paths.cache_dir={scratch}/cache",
                                              f"benchmark={args.benchmark}", f"limit={args.limit}", "evaluate=false",
                                              f"generation.max_new_tokens={args.max_new_tokens}",
                                              f"generation.batch_size={args.batch_size}", f"anchor={anchor}", f"spa.omega={omega}"])
                    for anchor in ANCHORS for omega in OMEGAS]

        load(configs("warm")[0])  # build and load the tiny model outside both timings
        begin = time.perf_counter()
        alone = [run_cell(cfg) for cfg in configs("alone")]
        one_by_one = time.perf_counter() - begin
        begin = time.perf_counter()
        grouped = run_group(configs("group"))
        group = time.perf_counter() - begin
        cells = sorted(set(alone))
        identical = all((g / "samples.jsonl").read_text() == (a / "samples.jsonl").read_text() for a, g in zip(alone, grouped))
    report = {
        "benchmark": "group_jobs", "dataset": args.benchmark, "tasks": args.limit, "cells": len(cells),
        "omegas": list(OMEGAS), "anchors": list(ANCHORS), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "model": "tiny (configs/model/tiny.yaml)", "device": platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "one_by_one_seconds": one_by_one, "group_seconds": group,
        "speedup": one_by_one / group, "samples_identical": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{len(cells)} cells x {args.limit} tasks: one by one {one_by_one:.1f}s, as one group {group:.1f}s, "
          f"ratio {one_by_one / group:.2f}x; samples identical: {identical} -> {args.out}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
