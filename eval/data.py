"""EvalPlus benchmark data, loaded offline through EvalPlus's own loaders and pinned by hash.

HumanEval+ v0.1.10 (164 tasks; HumanEval = its base tests) and MBPP+ v0.2.0 (378 tasks; MBPP = its
base tests). Files are looked up in ``<data_dir>/evalplus/`` where ``data_dir`` is the argument, else
``$SPA_DATA_DIR``, else ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # "humaneval" | "mbpp"
    file_name: str
    sha256: str  # of the file as stored (gzip), as EvalPlus releases it
    n_tasks: int
    override_env: str  # the variable EvalPlus reads
    release: str  # where users obtain the file

    @property
    def version(self) -> str:
        return self.file_name.split("-")[1].removesuffix(".jsonl.gz")


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "humaneval": BenchmarkSpec(
        name="humaneval",
        file_name="HumanEvalPlus-v0.1.10.jsonl.gz",
        sha256="272720b90ac375502c8ed23cd791c2a93dfb22a911641a494da74a426c09f101",
        n_tasks=164,
        override_env="HUMANEVAL_OVERRIDE_PATH",
        release="https://github.com/evalplus/humanevalplus_release (HEAD 200defc, file HumanEvalPlus.jsonl.gz)",
    ),
    "mbpp": BenchmarkSpec(
        name="mbpp",
        file_name="MbppPlus-v0.2.0.jsonl.gz",
        sha256="af43697e8791c4c149bdfd6b489d8b5412507551ac20e28a439f650b8225db63",
        n_tasks=378,
        override_env="MBPP_OVERRIDE_PATH",
        release="https://github.com/evalplus/mbppplus_release/releases/tag/v0.2.0 (file MbppPlus.jsonl.gz)",
    ),
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise DatasetError(
            f"Unknown benchmark {name!r}. Choose one of {sorted(BENCHMARKS)} "
            "(HumanEval and HumanEval+ are both 'humaneval': base and plus tests; likewise 'mbpp')."
        ) from None


def data_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get("SPA_DATA_DIR"):
        return Path(os.environ["SPA_DATA_DIR"]).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _verified(path: Path, expected_sha256: str) -> str:
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise DatasetError(
            f"Dataset file {path} has sha256 {actual}, expected {expected_sha256}: it is corrupt or a "
            "different release. Replace it with the exact file EvalPlus releases (see README 'Data'); "
            "the harness pins data by hash so that every number is comparable."
        )
    return actual


def dataset_path(name: str, data_dir_override: str | os.PathLike | None = None) -> Path:
    """Path of the verified dataset file of benchmark ``name``; a clear error if missing or corrupt."""
    spec = benchmark_spec(name)
    path = data_dir(data_dir_override) / "evalplus" / spec.file_name
    if not path.is_file():
        raise DatasetError(
            f"Dataset file for {name!r} not found at {path}. Put {spec.file_name} "
            f"(sha256 {spec.sha256[:12]}...) there, or point SPA_DATA_DIR (or the config's data_dir) "
            f"at a folder holding evalplus/{spec.file_name}. Obtain it from {spec.release}; "
            "no download happens at run time."
        )
    _verified(path, spec.sha256)
    return path


def dataset_sha256(name: str, data_dir_override: str | os.PathLike | None = None) -> str:
    spec = benchmark_spec(name)
    return _verified(dataset_path(name, data_dir_override), spec.sha256)


def load_tasks(name: str, data_dir_override: str | os.PathLike | None = None) -> dict[str, dict]:
    """All tasks of a benchmark, as EvalPlus's loader returns them (``task_id`` -> task dict).

    The tasks are returned in EvalPlus's order. MBPP+ inputs are deserialized by EvalPlus.
    """
    return dict(_load_tasks(name, str(dataset_path(name, data_dir_override))))


@lru_cache(maxsize=4)
def _load_tasks(name: str, path: str) -> tuple[tuple[str, dict], ...]:
    spec = benchmark_spec(name)
    # EvalPlus reads the override variable at import; setting the module global as well keeps this
    # correct when evalplus.data was imported earlier, and the variable reaches subprocesses.
    os.environ[spec.override_env] = path
    if name == "humaneval":
        import evalplus.data.humaneval as module

        module.HUMANEVAL_OVERRIDE_PATH = path
        tasks = module.get_human_eval_plus()
    else:
        import evalplus.data.mbpp as module

        module.MBPP_OVERRIDE_PATH = path
        tasks = module.get_mbpp_plus()
    if len(tasks) != spec.n_tasks:
        raise DatasetError(f"{path} holds {len(tasks)} tasks, expected {spec.n_tasks} for {name}.")
    return tuple(tasks.items())
