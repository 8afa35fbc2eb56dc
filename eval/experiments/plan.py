"""What sweeps will cost before they run: jobs, cells, generations, what is done, GPU memory and GPU-hours per model.

:func:`plan` expands each sweep exactly as ``scripts/run.py -m`` would (the preset's ``hydra.sweeper.params``
and the command line's values, through Hydra's own ``BasicSweeper.split_arguments``), plans every job's cell
with :func:`eval.runner.plan_cell` and looks at what already exists under the results tree. Sweeps are
planned in order, so a generation that an earlier sweep of the plan makes counts once, as it will run once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from eval.experiments.grouping import group_jobs, grouping_text, job_key
from eval.experiments.settings import project_path
from eval.store import REPO_ROOT, read_json

BENCH_DIR = REPO_ROOT / "results" / "bench"
# Used only when results/bench/ holds no GPU measurement, and printed as an assumption whenever it is used:
# SPA (two rows per sequence) at batch 16 on one A100-class GPU, bf16, for a 1B-parameter model; the time per
# token grows with the weights read per step, so it scales inversely with size. bitsandbytes' int8 and nf4
# kernels are slower than bf16 matmuls.
ASSUMED_TOKENS_PER_SECOND_1B = 2000.0
QUANTIZATION_SLOWDOWN = {"none": 1.0, "8bit": 3.0, "4bit": 2.0}
WEIGHT_BYTES = {"fp32": 4.0, "fp64": 8.0, "fp16": 2.0, "bf16": 2.0, "auto": 2.0}
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}
GPU_NAMES = ("nvidia", "tesla", "geforce", "quadro", "instinct", "radeon")


@dataclass
class ModelPlan:
    job_keys: set = field(default_factory=set)  # the launched jobs (group jobs: one per model, benchmark, protocol)
    skipped: int = 0  # combinations the sweep skips (skip_invalid)
    cells: set = field(default_factory=set)
    cells_done: set = field(default_factory=set)
    generations: int = 0  # samples the cells need, each generation counted once
    generations_done: int = 0
    tokens_to_do: int = 0  # an upper bound: every remaining sample runs to its token budget
    parameters_b: float = math.nan
    quantization: str = "none"
    dtype: str = "auto"

    @property
    def jobs(self) -> int:
        return len(self.job_keys)

    @property
    def weights_gb(self) -> float:
        return self.parameters_b * (QUANTIZED_BYTES.get(self.quantization) or WEIGHT_BYTES.get(self.dtype, 2.0))


@dataclass(frozen=True)
class Throughput:
    tokens_per_second_1b: float
    measured: bool
    source: str

    def hours(self, tokens: int, parameters_b: float, quantization: str) -> float:
        rate = self.tokens_per_second_1b / max(parameters_b, 1e-3) / QUANTIZATION_SLOWDOWN.get(quantization, 1.0)
        return tokens / rate / 3600


def sweep_jobs(primary: str, overrides: list[str]) -> tuple[list[list[str]], str]:
    """Each cell's overrides, as Hydra's basic sweeper expands them (Hydra's own overrides left out), and the
    sweep's ``grouping`` (how the launched jobs hold those cells: eval.experiments.grouping)."""
    parser = OverridesParser.create()
    parsed = [o for o in parser.parse_overrides(overrides) if not o.is_hydra_override()]
    master = compose(primary, overrides=[o.input_line for o in parsed if not o.is_sweep_override()], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(params + [o.input_line for o in parsed]), None)
    return jobs, str(master.get("grouping", "cell"))


def measured_throughput(bench_dir: Path = BENCH_DIR) -> Throughput:
    """SPA's measured GPU throughput from results/bench/ (scaled to 1B parameters), else the stated assumption."""
    best = None
    for path in sorted(bench_dir.glob("*.json")):
        bench = read_json(path)
        device = str(bench.get("device", ""))
        # scripts/bench_decoding.py names a CUDA device by its name, a CPU by its architecture.
        on_gpu = str(bench.get("preset", "")).startswith("gpu") or any(n in device.lower() for n in GPU_NAMES)
        if bench.get("benchmark") != "decoding" or not on_gpu:
            continue
        rows = [r for r in bench.get("results", []) if r.get("method") == "spa_engine"]
        if rows:
            row = max(rows, key=lambda r: r["batch_size"])
            size = _parameters_b(bench["model"])
            rate = row["tokens_per_second"] * size
            source = (f"measured: SPA {row['tokens_per_second']:.0f} tokens/s at batch {row['batch_size']} on {device} "
                      f"({path.name}, a {size:.2f}B-parameter shape), scaled inversely with model size")
            best = best if best and best.tokens_per_second_1b >= rate else Throughput(rate, True, source)
    return best or Throughput(
        ASSUMED_TOKENS_PER_SECOND_1B, False,
        f"ASSUMED, no GPU measurement in {bench_dir} (run `python scripts/bench_decoding.py --preset gpu-1.3b` on a "
        f"GPU to replace it): SPA decodes {ASSUMED_TOKENS_PER_SECOND_1B:.0f} tokens/s for a 1B model at batch 16 on one "
        "A100-class GPU in bf16, inversely with size, 3x slower with 8-bit and 2x with 4-bit weights",
    )


def _parameters_b(shape: dict) -> float:
    """Billions of weights of a Llama-shaped bench model (attention, MLP, embeddings and head)."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape.get("num_key_value_heads", shape["num_attention_heads"]) // shape["num_attention_heads"]
    return (layers * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]) + 2 * vocab * h) / 1e9


def _task_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            ids.add(json.loads(line)["task_id"])  # a truncated last line is redone by the runner
    return ids


def _cell_done(path: Path, fingerprint: str, wanted: list[str], evaluate: bool) -> bool:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = read_json(manifest_path)
    finished = manifest.get("status") == "complete" or (not evaluate and manifest.get("status") == "generated")
    return finished and manifest.get("fingerprint") == fingerprint and set(wanted) <= set(manifest.get("task_ids", []))


def plan(sweeps: list[list[str]], primary: str = "run") -> tuple[dict[str, ModelPlan], list[str], Throughput]:
    """Per model, what the sweeps (each a list of run.py overrides) will do; and one summary line per sweep."""
    from eval.runner import plan_cell, protocol_tasks, select_tasks

    attention = primary == "attention"
    models: dict[str, ModelPlan] = defaultdict(ModelPlan)
    wanted_of: dict[Path, set[str]] = defaultdict(set)  # per generation, the tasks every cell so far needs
    done_of: dict[Path, set[str]] = {}
    tasks_cache: dict[tuple, dict] = {}
    lines = []
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        for number, overrides in enumerate(sweeps):
            jobs, grouping = sweep_jobs(primary, overrides)
            launched = len(group_jobs(jobs, grouping))
            before = sum(m.generations - m.generations_done for m in models.values())
            cells, name = set(), None
            for job in jobs:
                cfg = compose(primary, overrides=job)
                name = cfg.experiment_name
                with contextlib.redirect_stdout(io.StringIO()):  # skip_invalid's "skip: ..." lines
                    cell = plan_cell(cfg, attention=attention)
                model = models[cfg.model.name]
                model.job_keys.add((number, job_key(job, grouping)))
                if cell is None:
                    model.skipped += 1
                    continue
                key = (cell.benchmark, json.dumps(cell.settings.protocol, sort_keys=True), str(project_path(cfg.paths.data_dir)))
                if key not in tasks_cache:
                    tasks_cache[key] = protocol_tasks(cfg, cell)
                wanted = select_tasks(cfg, tasks_cache[key])
                # Attention cells are not shared: each records its own measurements.
                store = cell.path if attention else cell.generation_path
                records = store / ("attention.jsonl" if attention else "samples.jsonl")
                done = done_of.setdefault(store, _task_ids(records))
                samples = int(cfg.generation.num_samples)
                new = set(wanted) - wanted_of[store]
                wanted_of[store] |= new
                model.generations += samples * len(new)
                model.generations_done += samples * len(new & done)
                model.tokens_to_do += samples * len(new - done) * int(cfg.generation.max_new_tokens)
                model.parameters_b = float(cfg.model.get("parameters_b") or math.nan)
                model.quantization, model.dtype = str(cfg.quantization.mode), str(cfg.model.dtype)
                model.cells.add(cell.path)
                cells.add(cell.path)
                if _cell_done(cell.path, cell.settings.fingerprint, wanted, bool(cfg.evaluate)):
                    model.cells_done.add(cell.path)
            after = sum(m.generations - m.generations_done for m in models.values())
            lines.append(f"sweep {name or ' '.join(overrides)}: {launched} jobs ({grouping_text(grouping)}), {len(cells)} cells, "
                         f"{after - before:,} new generations")
    return dict(models), lines, measured_throughput()


def render(models: dict[str, ModelPlan], lines: list[str], throughput: Throughput) -> str:
    header = (f"{'model':<30} {'jobs':>5} {'cells':>6} {'done':>5} {'generations':>12} {'to do':>8} "
              f"{'tokens to do (max)':>19} {'weights GB':>11} {'GPU-hours':>10}")
    rows, total_hours = [header, "-" * len(header)], 0.0
    for name, model in models.items():
        hours = throughput.hours(model.tokens_to_do, model.parameters_b, model.quantization)
        total_hours += hours
        rows.append(f"{name:<30} {model.jobs:>5} {len(model.cells):>6} {len(model.cells_done):>5} {model.generations:>12,} "
                    f"{model.generations - model.generations_done:>8,} {model.tokens_to_do:>19,} {model.weights_gb:>11.1f} "
                    f"{hours:>10.1f}")
    skipped = sum(m.skipped for m in models.values())
    return "\n".join([
        *lines, "", *rows, "",
        f"total: {sum(m.jobs for m in models.values())} jobs, "
        f"{sum(len(m.cells) for m in models.values())} cells ({sum(len(m.cells_done) for m in models.values())} done; "
        f"{skipped} combinations skipped as invalid), "
        f"{sum(m.generations - m.generations_done for m in models.values()):,} generations to run, "
        f"about {total_hours:.1f} GPU-hours",
        f"GPU-hours: {throughput.source}. Tokens assume every sample runs to generation.max_new_tokens (an upper bound; "
        "stops end most earlier). Weights GB is the weights alone: add the KV cache (both views) and activations.",
    ])
