"""scripts/plan.py: what sweeps will cost before they run (jobs, cells, generations, done, GPU-hours)."""

from __future__ import annotations

import json
import subprocess
import sys

from hydra import compose, initialize_config_dir

from eval.cli import CONFIG_DIR
from eval.experiments.plan import measured_throughput, plan, render
from eval.runner import run_cell
from tests.conftest import REPO_ROOT

SWEEP = ["anchor=nl,nl+test,nl+code,nl+code+test", "spa.omega=1.0,1.3"]


def test_plan_counts_each_generation_once_and_sees_what_is_done(tmp_path, data_dir):
    common = [f"paths.results_dir={tmp_path}", f"paths.data_dir={data_dir}", "limit=2", "evaluate=false",
              "generation.max_new_tokens=4", "experiment_name=race"]
    tiny = plan([common + SWEEP])[0]["tiny"]
    # One group job (one model and benchmark); omega = 1 is one cell (anchor none) for the four anchors: 5 cells of 2 tasks.
    assert (tiny.jobs, len(tiny.cells), len(tiny.cells_done), tiny.generations, tiny.generations_done) == (1, 5, 0, 10, 0)
    assert tiny.tokens_to_do == 10 * 4
    per_cell, lines, _ = plan([common + SWEEP + ["grouping=cell"]])
    assert per_cell["tiny"].jobs == 8 and lines == ["sweep race: 8 jobs (one per cell), 5 cells, 10 new generations"]
    assert plan([common + SWEEP + ["benchmark=humaneval,mbpp", "skip_invalid=true"]])[0]["tiny"].jobs == 2
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        run_cell(compose("run", overrides=[*common, "anchor=nl", "spa.omega=1.3"]))
    again = common[:-1] + ["experiment_name=again", "anchor=nl,nl+test", "spa.omega=1.3"]
    models, lines, throughput = plan([common + SWEEP, again])
    tiny = models["tiny"]
    assert (tiny.jobs, len(tiny.cells), len(tiny.cells_done), tiny.generations, tiny.generations_done) == (2, 7, 1, 10, 2)
    assert lines == ["sweep race: 1 jobs (one per model, benchmark and protocol), 5 cells, 8 new generations",
                     "sweep again: 1 jobs (one per model, benchmark and protocol), 2 cells, 0 new generations"]
    text = render(models, lines, throughput)
    assert "total: 2 jobs, 7 cells (1 done; 0 combinations skipped as invalid), 8 generations to run" in text
    assert "GPU-hours: " in text and "upper bound" in text


def test_gpu_numbers_come_from_the_bench_files_when_there_are_any(tmp_path):
    assert not measured_throughput(tmp_path).measured
    shape = {"vocab_size": 32256, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 16}
    (tmp_path / "decoding.json").write_text(json.dumps({
        "benchmark": "decoding", "preset": "gpu-1.3b", "device": "NVIDIA H100 80GB HBM3", "model": shape,
        "results": [{"batch_size": 1, "method": "spa_engine", "tokens_per_second": 40.0},
                    {"batch_size": 32, "method": "spa_engine", "tokens_per_second": 900.0}]}))
    throughput = measured_throughput(tmp_path)
    assert throughput.measured and "measured: SPA 900 tokens/s at batch 32 on NVIDIA H100" in throughput.source
    assert abs(throughput.hours(900 * 3600, 1.35, "none") - 1.35 / 1.35) < 0.01


def test_plan_cli(tmp_path, data_dir):
    def plan_cli(*arguments):
        return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "plan.py"), *arguments, f"paths.results_dir={tmp_path}",
                               f"paths.data_dir={data_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    result = plan_cli("-m", "+experiment=demo", "limit=1")
    assert result.returncode == 0, result.stderr
    assert "sweep demo: 2 jobs (one per model, benchmark and protocol), 6 cells" in result.stdout and "GPU-hours" in result.stdout
    refused = plan_cli("+experiment=demo", "omega=1.3")
    assert refused.returncode == 2 and "Unknown setting 'omega'" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs").exists()
