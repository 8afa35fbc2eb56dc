"""Benchmark data, loaded offline and pinned by hash: every EvalPlus release the harness knows, and the
task files of the paper authors' own code.

EvalPlus releases go through EvalPlus's own loaders (``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH``)
and are looked up in ``<data_dir>/evalplus/``, where ``data_dir`` is the argument, else ``$SPA_DATA_DIR``,
else ``../shared/data`` next to the repository. HumanEval = the base tests of HumanEval+, MBPP = the base
tests of MBPP+. A protocol (``configs/protocol/``) names the release it evaluates on; without one the
newest release is used.

The authors' task files (``HumanEval.jsonl``: the original HumanEval prompts; ``mbpp.jsonl``: MBPP+
v0.1.0's prompt as ``info_prompt`` and the original MBPP task sentence as ``prompt``) are what their code
gave the models; ``protocol=authors`` renders its prompts from them (README "Protocols").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_NAMES: tuple[str, ...] = ("humaneval", "mbpp")
_OVERRIDE_ENV = {"humaneval": "HUMANEVAL_OVERRIDE_PATH", "mbpp": "MBPP_OVERRIDE_PATH"}


@dataclass(frozen=True)
class DatasetSpec:
    """One EvalPlus release of a benchmark."""

    name: str  # "humaneval" | "mbpp"
    version: str  # "v0.1.10", ...
    file_name: str
    sha256: str  # of the file as stored (gzip), as EvalPlus releases it
    n_tasks: int
    release: str  # where users obtain the file

    @property
    def override_env(self) -> str:
        """The variable EvalPlus reads."""
        return _OVERRIDE_ENV[self.name]


# Newest release of each benchmark first: it is the default.
DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("humaneval", "v0.1.10", "HumanEvalPlus-v0.1.10.jsonl.gz",
                "272720b90ac375502c8ed23cd791c2a93dfb22a911641a494da74a426c09f101", 164,
                "https://github.com/evalplus/humanevalplus_release (HEAD 200defc, file HumanEvalPlus.jsonl.gz)"),
    DatasetSpec("humaneval", "v0.1.9", "HumanEvalPlus-v0.1.9.jsonl.gz",
                "e62f4130146963d969da64553f407a66e52d095adbfed4ee6733b4d59e14a3ed", 164,
                "https://github.com/evalplus/humanevalplus_release (commit 68cd26d, file HumanEvalPlus.jsonl.gz)"),
    DatasetSpec("mbpp", "v0.2.0", "MbppPlus-v0.2.0.jsonl.gz",
                "af43697e8791c4c149bdfd6b489d8b5412507551ac20e28a439f650b8225db63", 378,
                "https://github.com/evalplus/mbppplus_release/releases/tag/v0.2.0 (file MbppPlus.jsonl.gz)"),
    DatasetSpec("mbpp", "v0.1.0", "MbppPlus-v0.1.0.jsonl.gz",
                "57d639e77667d88930052b2b07212011c25c0bab94dfc1f19d15e1f7f558bfa9", 399,
                "https://github.com/evalplus/mbppplus_release/releases/tag/v0.1.0 (file MbppPlus.jsonl.gz)"),
)


@dataclass(frozen=True)
class AuthorsFile:
    """A task file of the authors' research code (github magic-YuanTian/Selective-Prompt-Anchoring, dataset/)."""

    benchmark: str
    file_name: str
    sha256: str
    n_tasks: int


AUTHORS_FILES: dict[str, AuthorsFile] = {
    "humaneval": AuthorsFile("humaneval", "HumanEval.jsonl", "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2", 164),
    "mbpp": AuthorsFile("mbpp", "mbpp.jsonl", "7d0618f25b41baf162d8de1237f74936a6448b7b061dcb26940bfa8c0d85153d", 399),
}
AUTHORS_SOURCE = "github magic-YuanTian/Selective-Prompt-Anchoring, folder dataset/ at commit cf91611 (deleted in b85e0af)"


def benchmark_spec(name: str, version: str | None = None) -> DatasetSpec:
    """The release ``version`` of benchmark ``name`` (None: the newest); a clear error for unknown ones."""
    if name not in BENCHMARK_NAMES:
        raise DatasetError(
            f"Unknown benchmark {name!r}. Choose one of {list(BENCHMARK_NAMES)} "
            "(HumanEval and HumanEval+ are both 'humaneval': base and plus tests; likewise 'mbpp')."
        )
    releases = [spec for spec in DATASETS if spec.name == name]
    if version is None:
        return releases[0]
    for spec in releases:
        if spec.version == version:
            return spec
    raise DatasetError(
        f"Unknown {name} release {version!r}. The harness pins these releases by hash: "
        f"{', '.join(spec.version for spec in releases)}."
    )


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
            "different release. Replace it with the exact file (see README 'Data'); the harness pins data "
            "by hash so that every number is comparable."
        )
    return actual


def dataset_path(name: str, data_dir_override: str | os.PathLike | None = None, version: str | None = None) -> Path:
    """Path of the verified dataset file of benchmark ``name``; a clear error if missing or corrupt."""
    spec = benchmark_spec(name, version)
    path = data_dir(data_dir_override) / "evalplus" / spec.file_name
    if not path.is_file():
        raise DatasetError(
            f"Dataset file for {name!r} {spec.version} not found at {path}. Put {spec.file_name} "
            f"(sha256 {spec.sha256[:12]}...) there, or point SPA_DATA_DIR (or the config's data_dir) "
            f"at a folder holding evalplus/{spec.file_name}. Obtain it from {spec.release}; "
            "no download happens at run time."
        )
    _verified(path, spec.sha256)
    return path


def dataset_sha256(name: str, data_dir_override: str | os.PathLike | None = None, version: str | None = None) -> str:
    spec = benchmark_spec(name, version)
    return _verified(dataset_path(name, data_dir_override, version), spec.sha256)


def load_tasks(name: str, data_dir_override: str | os.PathLike | None = None, version: str | None = None) -> dict[str, dict]:
    """All tasks of a benchmark release, as EvalPlus's loader returns them (``task_id`` -> task dict).

    The tasks are returned in EvalPlus's order. MBPP+ inputs are deserialized by EvalPlus.
    """
    spec = benchmark_spec(name, version)
    return dict(_load_tasks(spec, str(dataset_path(name, data_dir_override, version))))


@lru_cache(maxsize=4)
def _load_tasks(spec: DatasetSpec, path: str) -> tuple[tuple[str, dict], ...]:
    # EvalPlus reads the override variable at import; setting the module global as well keeps this
    # correct when evalplus.data was imported earlier, and the variable reaches subprocesses.
    os.environ[spec.override_env] = path
    if spec.name == "humaneval":
        import evalplus.data.humaneval as module

        module.HUMANEVAL_OVERRIDE_PATH = path
        tasks = module.get_human_eval_plus()
    else:
        import evalplus.data.mbpp as module

        module.MBPP_OVERRIDE_PATH = path
        tasks = module.get_mbpp_plus()
    if len(tasks) != spec.n_tasks:
        raise DatasetError(f"{path} holds {len(tasks)} tasks, expected {spec.n_tasks} for {spec.name} {spec.version}.")
    return tuple(tasks.items())


def authors_file(benchmark: str, directory: str | os.PathLike) -> tuple[Path, str]:
    """(path, sha256) of the authors' verified task file for ``benchmark`` in ``directory``."""
    spec = AUTHORS_FILES[benchmark_spec(benchmark).name]
    path = Path(directory).expanduser().resolve() / spec.file_name
    if not path.is_file():
        raise DatasetError(
            f"protocol=authors reads the authors' task file {spec.file_name} (sha256 {spec.sha256[:12]}...), "
            f"not found at {path}. It is in {AUTHORS_SOURCE}; put it there or point paths.authors_data_dir "
            "at the folder holding it (in this checkout: ../shared/reference/spa-authors/dataset)."
        )
    return path, _verified(path, spec.sha256)


def load_authors_tasks(benchmark: str, directory: str | os.PathLike) -> dict[str, dict]:
    """The authors' tasks of ``benchmark`` (``task_id`` -> their record), in their file's order."""
    path, _ = authors_file(benchmark, directory)
    return dict(_load_jsonl(str(path), AUTHORS_FILES[benchmark].n_tasks))


@lru_cache(maxsize=4)
def _load_jsonl(path: str, n_tasks: int) -> tuple[tuple[str, dict], ...]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) != n_tasks:
        raise DatasetError(f"{path} holds {len(records)} tasks, expected {n_tasks}.")
    return tuple((record["task_id"], record) for record in records)
