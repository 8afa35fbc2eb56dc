"""Evaluate EvalPlus-format samples with the sandboxed executor: verdicts, pass@1, eval_results.json.

A sample is ``{"task_id": ..., "solution": full program}`` or ``{"task_id": ..., "completion": ...}``
(appended to the task's prompt, as EvalPlus does). Samples may cover any subset of a benchmark's
tasks, several per task. Each is judged on the task's base tests, then on its plus tests,
independently: ``pass``, ``fail`` (wrong output, exception, unsupported output type), ``timeout``
or ``error`` (the process crashed, exited early or broke the executor's protocol), with the first
failing input and a short reason. pass@1 is the mean over the tasks present of the fraction of
their samples that pass; "plus" requires base and plus to pass (EvalPlus's semantics).

The expected outputs are the canonical solutions' outputs (``eval.execution.groundtruth``), computed in
the same sandbox for the tasks present and cached, with each input's CPU time, from which the time limits
are calibrated. See ``docs/executor.md``.
"""

from __future__ import annotations

import gzip
import json
import os
import reprlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from eval.benchmarks.data import benchmark_spec, dataset_sha256, load_tasks
from eval.errors import ConfigError, HarnessError
from eval.execution.groundtruth import PHASES, GroundTruth, TaskTruth, oracle_kind
from eval.execution.pool import parallel
from eval.execution.sandbox import PASS, Phase, PhaseVerdict, Sandbox, SandboxConfig, Suite

STATUSES = ("pass", "fail", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    """Time and memory limits, calibrated from the canonical solution (EvalPlus's scheme, in CPU time)."""

    min_time_limit: float = 1.0  # CPU seconds per input at least (EvalPlus: 1 s of wall time)
    gt_time_limit_factor: float = 4.0  # x the canonical solution's CPU time on that input (EvalPlus: 4)
    phase_cpu_cap: float = 60.0  # CPU seconds per test set (EvalPlus: 60 s wall), raised to factor x canonical
    memory_factor: float = 2.0  # address space: max(sandbox memory_limit_mb, factor x canonical peak)
    groundtruth_cpu_s: float = 600.0  # CPU seconds per test set for a canonical solution


# Samples ---------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike) -> list[dict]:
    """Samples from an EvalPlus-format JSONL file (optionally gzipped), in file order."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(
            f"Samples file {path} not found. Pass samples=PATH pointing at a JSONL file with one "
            '{"task_id": ..., "solution": ...} (or "completion") object per line.'
        )
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HarnessError(
                    f"Line {number} of {path} is not valid JSON ({exc.msg}). Each line must be one "
                    'JSON object such as {"task_id": "HumanEval/0", "solution": "def ..."}.'
                ) from None
            samples.append(sample)
    return samples


def _programs(samples: list[dict], tasks: dict[str, dict], benchmark: str) -> list[tuple[str, str]]:
    """(task_id, program) of each sample; a clear error for the first malformed one."""
    if not samples:
        raise HarnessError("No samples to evaluate: the samples list is empty.")
    programs = []
    for number, sample in enumerate(samples, 1):
        task_id = sample.get("task_id") if isinstance(sample, dict) else None
        if task_id not in tasks:
            example = next(iter(tasks))
            raise HarnessError(
                f"Sample {number} has task_id {task_id!r}, which is not a {benchmark} task. Task ids "
                f"look like {example!r}; check that benchmark={benchmark} matches the samples."
            )
        if isinstance(sample.get("solution"), str):
            programs.append((task_id, sample["solution"]))
        elif isinstance(sample.get("completion"), str):
            programs.append((task_id, tasks[task_id]["prompt"] + sample["completion"]))
        else:
            raise HarnessError(
                f"Sample {number} ({task_id}) has neither a 'solution' (full program) nor a "
                "'completion' (appended to the prompt) string. Add one of the two fields."
            )
    return programs


# Test suites ------------------------------------------------------------------------------------


def _test_suite(benchmark: str, task: dict, truth: TaskTruth, limits: Limits, memory_limit_mb: int) -> Suite:
    """The task's tests with limits calibrated from its canonical solution's CPU times."""
    import evalplus.eval._special_oracle as special_oracle

    phases = []
    for p, name in enumerate(PHASES):
        times = truth.cpu_times[p]
        cpu_limits = tuple(max(limits.min_time_limit, limits.gt_time_limit_factor * t) for t in times)
        # EvalPlus caps a test set at 60 s; never below what the canonical solution needs x factor.
        budget = min(sum(cpu_limits), max(limits.phase_cpu_cap, limits.gt_time_limit_factor * sum(times)))
        phases.append(Phase(name, list(task[f"{name}_input"]), max(budget, limits.min_time_limit), cpu_limits, tuple(truth.digests[p])))
    return Suite(
        task["entry_point"],
        tuple(phases),
        oracle=oracle_kind(benchmark, task),
        atol=float(task["atol"]),
        memory_limit=max(memory_limit_mb << 20, int(limits.memory_factor * truth.peak_memory)),
        # A program's output may be twice the canonical one's size; more is a flood of the harness's memory.
        max_output=max(64 << 20, 2 * max((n for phase in truth.sizes for n in phase), default=0) + (1 << 20)),
        oracle_module=special_oracle,
    )


# Evaluation -------------------------------------------------------------------------------------


def executor_settings(executor: dict) -> tuple[SandboxConfig, Limits]:
    """(SandboxConfig, Limits) from the ``executor`` config group (configs/executor/default.yaml)."""
    try:
        sandbox = dict(executor["sandbox"], allow_unsandboxed=bool(executor.get("allow_unsandboxed", False)))
        return SandboxConfig(**sandbox), Limits(**executor["limits"])
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"Invalid executor setting ({exc}); see configs/executor/default.yaml.") from None


def evaluate_samples(
    benchmark: str,
    samples: list[dict],
    *,
    data_dir: str | os.PathLike | None = None,
    n_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sandbox_config: SandboxConfig | None = None,
    limits: Limits | None = None,
    dataset_version: str | None = None,
) -> dict:
    """Judges every sample; returns the eval_results structure (see the module docstring).

    ``n_workers`` defaults to the number of CPUs; results do not depend on it. ``dataset_version`` is
    the EvalPlus release whose tests judge the samples (None: the newest, see ``eval.benchmarks.data``).
    """
    spec = benchmark_spec(benchmark, dataset_version)  # a clear error for an unknown name or release
    limits = limits or Limits()
    tasks = load_tasks(benchmark, data_dir, spec.version)
    programs = _programs(samples, tasks, benchmark)
    sha256 = dataset_sha256(benchmark, data_dir, spec.version)
    sandbox = Sandbox(sandbox_config, n_workers)
    needed = list(dict.fromkeys(task_id for task_id, _ in programs))
    truth = GroundTruth.load_or_compute(benchmark, tasks, sandbox, sha256=sha256, needed=needed, cache_dir=cache_dir,
                                        groundtruth_cpu_s=limits.groundtruth_cpu_s, progress=progress)
    suites = {
        task_id: _test_suite(benchmark, tasks[task_id], truth.tasks[task_id], limits, sandbox.config.memory_limit_mb)
        for task_id in needed
    }

    def judge(index: int) -> list[PhaseVerdict]:
        task_id, code = programs[index]
        return sandbox.run(code, suites[task_id], lambda p, i: truth.blob(task_id, p, i))

    # Longest first (by the canonical solution's CPU time) keeps all workers busy until the end.
    order = sorted(range(len(programs)), key=lambda k: -sum(map(sum, truth.tasks[programs[k][0]].cpu_times)))
    verdicts = dict(zip(order, parallel(judge, order, sandbox.n_workers, progress, f"{benchmark} samples")))
    results = _results(benchmark, sha256, tasks, programs, [verdicts[k] for k in range(len(programs))], sandbox, limits)
    return {**results, "dataset_version": spec.version}


_input_repr = reprlib.Repr()
_input_repr.maxlevel, _input_repr.maxstring, _input_repr.maxlong, _input_repr.maxother = 4, 120, 120, 120
_input_repr.maxlist = _input_repr.maxtuple = _input_repr.maxset = _input_repr.maxdict = 12


def _details(task: dict, verdicts: list[PhaseVerdict]) -> dict:
    details = {}
    for name, verdict in zip(PHASES, verdicts):
        if verdict.status == PASS:
            details[name] = None
            continue
        failing = None if verdict.index is None else task[f"{name}_input"][verdict.index]
        details[name] = {
            "input_index": verdict.index,
            "input": None if failing is None else _input_repr.repr(list(failing)),
            "reason": verdict.reason,
        }
    return details


def _results(benchmark, sha256, tasks, programs, verdicts, sandbox: Sandbox, limits: Limits) -> dict:
    import evalplus

    per_task: dict[str, list[dict]] = {}
    for (task_id, _), sample_verdicts in zip(programs, verdicts):
        base, plus = sample_verdicts
        per_task.setdefault(task_id, []).append(
            {"base_status": base.status, "plus_status": plus.status, "details": _details(tasks[task_id], sample_verdicts)}
        )
    base_rates, plus_rates = [], []
    for entries in per_task.values():
        base_rates.append(sum(e["base_status"] == PASS for e in entries) / len(entries))
        plus_rates.append(sum(e["base_status"] == e["plus_status"] == PASS for e in entries) / len(entries))
    counts = {
        name: {status: Counter(e[f"{name}_status"] for es in per_task.values() for e in es)[status] for status in STATUSES}
        for name in PHASES
    }
    return {
        "benchmark": benchmark,
        "dataset_sha256": sha256,
        "pass@1": {"base": sum(base_rates) / len(base_rates), "plus": sum(plus_rates) / len(plus_rates)},
        "tasks": per_task,
        "n_samples": len(programs),
        "n_tasks": len(per_task),
        "status_counts": counts,
        "evalplus_version": evalplus.__version__,
        "limits": asdict(limits),
        "protections": sandbox.protections.summary(),
    }


def write_eval_results(path: str | os.PathLike, results: dict) -> None:
    """Writes ``results`` as JSON atomically (a reader never sees a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
