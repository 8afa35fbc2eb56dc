"""The results store: one directory per cell, crash-safe appends, resume, locking and provenance.

A cell is ``<runs_dir>/<experiment>/<model>/<benchmark>/<protocol>/<anchor>/omega=<omega>/`` (another method than
SPA adds its name after the protocol: ``.../<protocol>/<method>/<anchor>/<parameter>=<strength>/``, see
:func:`cell_levels`) holding
``samples.jsonl`` (EvalPlus format plus our fields, appended one task at a time and fsynced),
``eval_results.json`` and ``manifest.json`` (written atomically). A cell directory belongs to one
configuration: its fingerprint (everything that changes the samples) is kept in the manifest, and a
different configuration pointed at it is refused. An experiment's cell links its ``samples.jsonl`` to the shared
generation of its settings (``results/cells/<key>/``, the same kind of directory). An exclusive lock keeps two
processes (SLURM jobs) from writing one directory: the second waits for the first, then reuses what it wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eval.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "bitsandbytes", "evalplus", "hydra-core", "omegaconf", "pandas",
            "matplotlib", "spa-harness")


def format_omega(omega: float) -> str:
    """``1.0`` -> ``"1.0"``, ``1.28`` -> ``"1.28"``: shortest exact form, always with a decimal point."""
    text = repr(float(omega))
    return text if "e" not in text else f"{omega:.6f}".rstrip("0")


def cell_levels(method: str = "spa", attention: bool = False) -> tuple[str, ...]:
    """The keys a cell's directories name, in order, below the runs dir; the leaf ``<parameter>=<strength>`` follows.

    SPA's cells (the plain model's among them) keep the layout they always had,
    ``<experiment>/<model>/<benchmark>/<protocol>/<anchor>/omega=<omega>``; another method adds one level, its name,
    after the protocol: ``.../<protocol>/<method>/<anchor>/<parameter>=<strength>`` (``cad/nl/alpha=0.5``).
    Attention cells have no anchor level.
    """
    levels = ("experiment", "model", "benchmark", "protocol")
    if attention:
        return levels
    return levels + (() if method == "spa" else ("method",)) + ("anchor",)


def cell_dir(runs_dir: Path, experiment: str, model: str, benchmark: str, protocol: str, anchor: str | None, omega: float,
             *, method: str = "spa", parameter: str = "omega") -> Path:
    """The cell's directory (layout: :func:`cell_levels`); ``omega`` is the value of the method's ``parameter``.
    Attention cells (``anchor=None``) have no anchor level."""
    keys = {"experiment": experiment, "model": model, "benchmark": benchmark, "protocol": protocol, "method": method,
            "anchor": anchor}
    parts = [keys[level] for level in cell_levels(method, attention=anchor is None)]
    return Path(runs_dir).joinpath(*parts, f"{parameter}={format_omega(omega)}")


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise HarnessError(
            f"Result file {path} is unreadable or corrupt ({error}). Move it away (or delete it) and rerun "
            "the same command: the cell resumes from its samples.jsonl."
        ) from None


def git_commit() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict:
    import torch

    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if key in os.environ:
            info[key.lower()] = os.environ[key]
    return info


@contextmanager
def file_lock(path: Path, what: Path):
    """An exclusive lock on the file ``path`` (created with its folder), held while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another job is writing it; what it writes is what this job would write, so wait and reuse it.
            print(f"waiting for {what}: another job is writing it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel releases it when that job ends, even if killed
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class Cell:
    """One cell directory. Use as a context manager: it holds the cell's lock while open."""

    path: Path
    settings_fingerprint: str
    records_name: str = "samples.jsonl"  # the cell's JSONL of per-task records (attention.jsonl for attention runs)

    @property
    def records_path(self) -> Path:
        return self.path / self.records_name

    @property
    def results_path(self) -> Path:
        return self.path / "eval_results.json"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def __enter__(self) -> "Cell":
        self._lock = file_lock(self.path / ".lock", self.path)
        self._lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def manifest(self) -> dict | None:
        return read_json(self.manifest_path) if self.manifest_path.exists() else None

    def claim(self, force: bool) -> None:
        """Make the cell this configuration's: ``force`` starts it over; another configuration's is refused."""
        if force:
            self.reset()
            return
        manifest = self.manifest()
        if manifest is not None and manifest.get("fingerprint") != self.settings_fingerprint:
            raise HarnessError(
                f"Results dir {self.path} was produced by a different configuration (fingerprint "
                f"{manifest.get('fingerprint')} there, {self.settings_fingerprint} now). Use another "
                "experiment name (experiment_name=...) to keep both, or force=true to discard the old results."
            )

    def reset(self) -> None:
        for path in (self.records_path, self.results_path, self.manifest_path):
            path.unlink(missing_ok=True)

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest.get("status") == "complete" and self.results_path.exists())

    def load_records(self) -> list[dict]:
        """Records written so far; a truncated last line (a crash mid-write) is dropped with a warning."""
        if not self.records_path.exists():
            return []
        with open(self.records_path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        samples, good_bytes = [], 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                    warnings.warn(f"{self.records_path}: dropping a truncated last line (a crash mid-write); that task is redone")
                    with open(self.records_path, "r+b") as f:
                        f.truncate(good_bytes)
                    break
                raise HarnessError(
                    f"{self.records_path} line {number} is corrupt (not JSON) in the middle of the file. Move the "
                    "file away and rerun to regenerate the cell, or repair that line."
                ) from None
            good_bytes += len(line) + 1
        return samples

    def link_records(self, target: Path) -> None:
        """Make this cell's records file a relative symlink to ``target`` (a shared generation's), atomically."""
        link = self.records_path
        relative = Path(os.path.relpath(target, link.parent))
        if link.is_symlink() and Path(os.readlink(link)) == relative:
            return
        if link.exists() and not link.is_symlink():
            raise HarnessError(
                f"{link} holds its own samples (a cell written before generations were shared), so it is not "
                "replaced by a link. Move the cell directory away to keep it, or rerun with force=true to discard it."
            )
        tmp = link.with_name(f".{link.name}.link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(relative)
        os.replace(tmp, link)

    def append_records(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.records_path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, {**manifest, "fingerprint": self.settings_fingerprint})


def python_command() -> str:
    return " ".join([sys.executable, *sys.argv])
