"""Ground truth: the canonical solutions' outputs, computed in the sandbox for the tasks a run needs, cached.

The cache is one file per benchmark, dataset hash and Python version under ``results/cache/groundtruth/``
(outside every sandbox: no program can read it), holding per task each input's output (compressed marshal
bytes), its digest and the canonical solution's CPU time, from which the time limits are calibrated, and
the solution's peak memory. Only the tasks a run judges are computed; a later run needing more adds them.
The file carries checksums (a corrupt one is reported and recomputed) and is replaced atomically, so
parallel evaluations never see a partial file (the worst a race costs is computing a task twice).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from eval.benchmarks.data import REPO_ROOT
from eval.errors import HarnessError
from eval.execution.pool import parallel
from eval.execution.sandbox import Phase, PhaseVerdict, Recording, Sandbox, Suite

DEFAULT_CACHE_DIR = REPO_ROOT / "results" / "cache" / "groundtruth"
PHASES = ("base", "plus")
CACHE_FORMAT = 2
_CACHE_MAGIC = b"SPA-GROUNDTRUTH\n"


def oracle_kind(benchmark: str, task: dict) -> str | None:
    """EvalPlus's special oracle for a task (see ``eval.execution.judge.compare``), or None for plain equality."""
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS

    entry_point = task["entry_point"]
    if benchmark == "humaneval":
        return "poly_root" if entry_point == "find_zero" else None
    special = {"are_equivalent": "always", "sum_div": "or_zero", "surface_Area": "surface_area", "digit_distance_nums": "digit_distance"}
    if entry_point in special:
        return special[entry_point]
    if entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
        return "set_eq"
    if entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
        return "not_none"
    return None


@dataclass(frozen=True)
class TaskTruth:
    cpu_times: list[list[float]]  # per phase, per input: CPU seconds of the canonical solution
    digests: list[list[str]]  # of its outputs' plain encoding
    blobs: list[list[bytes]]  # zlib-compressed plain encoding of each output
    sizes: list[list[int]]  # uncompressed bytes of each output
    peak_memory: int  # bytes of address space


class GroundTruth:
    """Expected outputs of (some of) a benchmark's canonical solutions."""

    def __init__(self, tasks: dict[str, TaskTruth]):
        self.tasks = tasks

    def blob(self, task_id: str, phase: int, index: int) -> bytes:
        """The compressed plain encoding of the canonical output of one input."""
        return self.tasks[task_id].blobs[phase][index]

    @classmethod
    def load_or_compute(
        cls,
        benchmark: str,
        tasks: dict[str, dict],
        sandbox: Sandbox,
        *,
        sha256: str,
        needed: list[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        groundtruth_cpu_s: float = 600.0,
        progress: bool = True,
    ) -> GroundTruth:
        """The ground truth of the ``needed`` tasks (default: all), computing only what the cache lacks."""
        needed = list(tasks) if needed is None else list(dict.fromkeys(needed))
        cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        version = f"{sys.version_info.major}{sys.version_info.minor}"
        path = cache_dir / f"{benchmark}-{sha256[:16]}-py{version}-v{CACHE_FORMAT}.gt"
        header = {"benchmark": benchmark, "dataset_sha256": sha256, "python": version}
        cached: dict[str, TaskTruth] = {}
        if path.exists():
            try:
                cached = _load(path, header)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                warnings.warn(f"Ground-truth cache {path} is corrupt ({exc}); recomputing it.", RuntimeWarning, stacklevel=2)
        missing = [task_id for task_id in needed if task_id not in cached]
        if missing:
            if progress:
                print(f"Computing the expected outputs of {len(missing)} {benchmark} task(s) in the sandbox "
                      f"(once: cached in {path.parent})", file=sys.stderr)

            def record(task_id: str) -> TaskTruth:
                return _record(benchmark, task_id, tasks[task_id], sandbox, groundtruth_cpu_s)

            computed = dict(zip(missing, parallel(record, missing, sandbox.n_workers, progress, f"{benchmark} expected outputs")))
            # Re-read: a parallel evaluation may have added tasks meanwhile; keep them.
            if path.exists():
                try:
                    cached = {**_load(path, header), **cached}
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            cached.update(computed)
            _write(path, header, cached)
        return cls({task_id: cached[task_id] for task_id in needed})


def _record(benchmark: str, task_id: str, task: dict, sandbox: Sandbox, cpu_s: float) -> TaskTruth:
    """Runs one canonical solution in the sandbox (trusted: no per-input limits) and records its outputs."""
    suite = Suite(
        task["entry_point"],
        tuple(Phase(name, list(task[f"{name}_input"]), cpu_s) for name in PHASES),
        oracle=oracle_kind(benchmark, task),
    )
    outcome = sandbox.record(task["prompt"] + task["canonical_solution"], suite)
    if isinstance(outcome, PhaseVerdict):
        raise HarnessError(
            f"The canonical solution of {task_id} failed in the sandbox ({outcome.status}: {outcome.reason}), so "
            "its expected outputs cannot be computed. Check the dataset file, and the executor settings if they "
            "were changed."
        )
    return _truth(outcome)


def _truth(recording: Recording) -> TaskTruth:
    return TaskTruth(recording.cpu_times, recording.digests, recording.blobs, recording.sizes, recording.peak_memory)


def cached_task_ids(path: str | os.PathLike) -> set[str]:
    """The tasks a cache file holds (checksums verified)."""
    return set(_load(Path(path), {}))


def _load(path: Path, expected_header: dict) -> dict[str, TaskTruth]:
    with open(path, "rb") as f:
        if f.read(len(_CACHE_MAGIC)) != _CACHE_MAGIC:
            raise ValueError("not a ground-truth cache file")
        header = json.loads(f.readline(4096))
        manifest_bytes = f.read(header["manifest_size"])
        blobs = f.read(header["blobs_size"] + 1)
    if blake2b(manifest_bytes).hexdigest() != header["manifest_blake2b"]:
        raise ValueError("manifest checksum mismatch")
    if len(blobs) != header["blobs_size"] or blake2b(blobs).hexdigest() != header["blobs_blake2b"]:
        raise ValueError("expected-output checksum mismatch (truncated or modified)")
    manifest = json.loads(manifest_bytes)
    if {k: manifest[k] for k in expected_header} != expected_header:
        raise ValueError("built for another dataset")
    view = memoryview(blobs)
    return {
        task_id: TaskTruth(t["cpu_times"], t["digests"], [[bytes(view[o:o + n]) for o, n in ph] for ph in t["blob_spans"]],
                           t["sizes"], t["peak_memory"])
        for task_id, t in manifest["tasks"].items()
    }


def _write(path: Path, header: dict, tasks: dict[str, TaskTruth]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(header, format=CACHE_FORMAT, tasks={})
    chunks, offset = [], 0
    for task_id, truth in tasks.items():
        spans = []
        for phase_blobs in truth.blobs:
            spans.append([])
            for blob in phase_blobs:
                chunks.append(blob)
                spans[-1].append((offset, len(blob)))
                offset += len(blob)
        manifest["tasks"][task_id] = {"cpu_times": truth.cpu_times, "digests": truth.digests, "blob_spans": spans,
                                      "sizes": truth.sizes, "peak_memory": truth.peak_memory}
    blobs = b"".join(chunks)
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    file_header = {
        "format": CACHE_FORMAT,
        "manifest_size": len(manifest_bytes),
        "manifest_blake2b": blake2b(manifest_bytes).hexdigest(),
        "blobs_size": len(blobs),
        "blobs_blake2b": blake2b(blobs).hexdigest(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(_CACHE_MAGIC + json.dumps(file_header).encode() + b"\n" + manifest_bytes + blobs)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
