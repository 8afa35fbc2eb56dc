"""Sandboxed execution of untrusted solutions: one contained child process per sample.

The harness side is :class:`Sandbox`. Each call runs one program against a :class:`Suite` (the
task's test inputs, split into phases such as ``base`` and ``plus``) in a fresh child::

    harness thread ── unshare --net --pid --mount --fork ── init (this file, root, trusted)
                                                              └── worker (dropped uid, untrusted code)

* ``init`` is PID 1 of private PID, network and mount namespaces. It mounts a fresh ``/proc``, a
  size-capped tmpfs on ``/tmp`` (the scratch dir ``/tmp/scratch`` is the worker's cwd, HOME and
  TMPDIR) and on ``/dev/shm`` and ``/run``, exposes the interpreter if it lives under a private
  directory such as ``/root`` (and hides the rest of that directory), remounts everything else
  read-only, then forks the worker and waits. When init exits, the kernel kills every process left
  in the namespace, so nothing the program started can outlive its sample.
* The worker sets CPU-time, address-space, file-size, process-count and core-size limits, drops to
  a uid of its own that no account uses (as root; this is what makes the process limit and file
  permissions bite), sets ``no_new_privs``, points stdin/stdout/stderr at ``/dev/null`` and runs
  the program: for every input it calls the entry point under a CPU-time timer (``ITIMER_PROF``;
  ``RLIMIT_CPU`` is the backstop), turns the returned object into plain data with ``marshal``
  (which accepts exact builtin types only, so objects with hostile ``__eq__``/``__repr__`` never
  reach a comparison) and checks it: its digest against the canonical output's digest (exact
  typed equality; the parent verifies these), else EvalPlus's tolerant comparison and special
  oracles on plain values, with the expected value fetched from the parent on demand.
* The harness reads one short record per input from a pipe (capped, never buffered unbounded),
  enforces wall-clock backstops calibrated from the CPU limits (so that load does not change
  verdicts) and kills the whole process group, hence the namespace, when one is exceeded.

Where a layer is unavailable (no ``unshare``, not root, interpreter unreadable by another uid) the
sandbox degrades to the next one and :attr:`Sandbox.protections` says so; see ``docs/executor.md``.

This file is also the child program. The child starts once per sample, so its half (everything
above the "harness side" line) imports only light standard-library modules, and the harness
compiles it once and ships the code object to a ``python -S -c`` bootstrap: a script would be
recompiled at every start.
"""

from __future__ import annotations

import _signal
import marshal
import os
import sys
import time
import zlib
from _blake2 import blake2b

# Records written by the child, one tab-separated line each ("p" = phase number, "i" = input index).
REC_SETUP = "S"  # init: namespaces and mounts are ready (fields: key=value)
REC_WORKER = "W"  # worker: limits applied and privileges dropped, about to run the program
REC_DEFINED = "D"  # D p: the program was executed and the entry point found for phase p
REC_PASS = "P"  # P p i digest: output identical to the canonical output (verified by the parent)
REC_JUDGED = "J"  # J p i: output accepted by the tolerant comparison or a special oracle
REC_QUERY = "Q"  # Q p i: send me the expected value of input i (framed on stdin)
REC_FAIL = "F"  # F p i kind reason: phase p failed at input i (i = -1: while defining)
REC_RESULT = "R"  # R p i cpu digest nbytes, then nbytes of blob: recorded canonical output
REC_MEMORY = "M"  # M bytes: peak address space of the worker (recording only)
REC_END = "E"  # all phases done
REC_EXIT = "Z"  # init: Z exitcode cpu_seconds, the worker's fate

FAIL_WRONG = "wrong"
FAIL_EXCEPTION = "exception"
FAIL_TIMEOUT = "timeout"
FAIL_UNSUPPORTED = "unsupported"

SCRATCH_IN_NAMESPACE = "/tmp/scratch"
MARSHAL_VERSION = 2  # no back-references and no interning flags: equal values give equal bytes
REASON_CHARS = 300
_FRAME_HEADER = 8  # big-endian length prefix of frames sent to the child


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------


class _CpuTimeout(BaseException):
    """Raised inside the program by SIGPROF when its CPU time for one input is spent."""


class _Unsupported(Exception):
    """The program returned an object that is not plain data."""


def _child_main() -> None:
    job = marshal.loads(_read_frame(0))
    suite = marshal.loads(_read_frame(0))
    box = job["sandbox"]
    facts = {}
    if box["mount_namespace"]:
        try:
            facts.update(_setup_mounts(box))
        except OSError as exc:
            _write_record(1, REC_SETUP, "error=" + _one_line(f"{exc.filename}: {exc}"))
            os._exit(70)
    _write_record(1, REC_SETUP, *(f"{k}={v}" for k, v in facts.items()))
    worker = os.fork()
    if worker == 0:
        code = 0
        try:
            _worker_main(job, suite)
        except BaseException as exc:  # the executor's own failure, reported as an abnormal exit
            code = 71
            try:
                _write_record(3, REC_FAIL, "-1", "-1", "setup", _one_line(repr(exc)))
            except BaseException:
                pass
        os._exit(code)
    _, status, usage = os.wait4(worker, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    _write_record(1, REC_EXIT, str(exit_code), f"{usage.ru_utime + usage.ru_stime:.3f}")
    os._exit(exit_code if exit_code >= 0 else 128 - exit_code)


def _worker_main(job: dict, suite: dict) -> None:
    box = job["sandbox"]
    # The result pipe moves to fd 3 and the control pipe to fd 4 (both close-on-exec); the
    # program's own stdin/stdout/stderr are /dev/null, so floods cost it CPU time and nothing else.
    os.dup2(1, 3, inheritable=False)
    os.dup2(0, 4, inheritable=False)
    null_in = os.open(os.devnull, os.O_RDONLY)
    null_out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_in, 0)
    os.dup2(null_out, 1)
    os.dup2(null_out, 2)
    os.close(null_in)
    os.close(null_out)
    if box["pid_namespace"]:
        os.setsid()  # so that killpg(0) cannot reach the `unshare` process outside the namespace
    oracle_module = _load_oracle_module(suite["oracle_file"]) if suite["oracle_file"] else None
    import resource

    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # oversized writes fail with EFBIG instead
    _signal.signal(_signal.SIGPROF, _raise_cpu_timeout)
    cpu = job["cpu_limit"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (box["file_size_limit"],) * 2)
    memory = job["memory_limit"]
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        # As EvalPlus's reliability_guard does: lets deep recursion use the whole allowance.
        resource.setrlimit(resource.RLIMIT_STACK, (memory, memory))
    if box["block_sockets"]:
        _block_sockets()
    if box["guard"]:
        _guard_process_calls()
    uid = job["uid"]
    if uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (box["max_processes"],) * 2)
        _drop_privileges(uid, box["read_all"])
    no_new_privs = _set_no_new_privs()
    scratch = job["scratch"]
    os.chdir(scratch)
    os.environ["HOME"] = os.environ["TMPDIR"] = os.environ["PWD"] = scratch
    sys.path[:] = box["sys_path"]
    _write_record(
        3, REC_WORKER, f"uid={os.getuid()}", f"no_new_privs={int(no_new_privs)}",
        f"sockets_blocked={int(box['block_sockets'])}",
    )
    if job["record"]:
        _record_phases(job, suite)
    else:
        _test_phases(job, suite, oracle_module)
    _write_record(3, REC_END)


def _test_phases(job: dict, suite: dict, oracle_module) -> None:
    oracle, atol = suite["oracle"], suite["atol"]
    entry_point = suite["entry_point"]
    for p in range(job["first_phase"], len(suite["phases"])):
        phase = suite["phases"][p]
        started = time.process_time()
        budget = phase["budget"]
        fn = _define(job["code"], entry_point, p, budget)
        if fn is None:
            continue
        for i, args in enumerate(phase["inputs"]):
            remaining = budget - (time.process_time() - started)
            if remaining <= 0:
                _fail(p, i, FAIL_TIMEOUT, f"phase CPU budget of {budget:.1f}s spent")
                break
            limit = min(phase["cpu_limits"][i], remaining)
            if not _test_one(fn, args, p, i, limit, phase["digests"][i], oracle, atol, oracle_module):
                break


def _define(code: str, entry_point: str, p: int, cpu_limit: float):
    """Executes the program in fresh globals (as EvalPlus does per test set); the entry point or None."""
    namespace: dict = {}
    try:
        _arm(cpu_limit)
        try:
            exec(code, namespace)
            fn = namespace[entry_point]
        finally:
            _disarm()
    except _CpuTimeout:
        _fail(p, -1, FAIL_TIMEOUT, f"defining the solution took more than {cpu_limit:.1f}s of CPU time")
        return None
    except BaseException as exc:
        _fail(p, -1, FAIL_EXCEPTION, "while defining the solution: " + _describe(exc))
        return None
    _write_record(3, REC_DEFINED, str(p))
    return fn


def _test_one(fn, args, p, i, limit, digest, oracle, atol, oracle_module) -> bool:
    """Runs input i and reports it; False when the phase failed there.

    The CPU limit covers the call and the conversion of its output to plain data (the canonical
    solution's time was measured the same way): a huge output costs what it costs, a hostile one
    cannot stall the check.
    """
    # The oracles that read the input get a pristine copy: the program may mutate its arguments.
    oracle_args = marshal.loads(marshal.dumps(args)) if oracle in _ORACLES_READING_INPUT else None
    converting = False
    try:
        _arm(limit)
        try:
            out = fn(*args)
            converting = True
            if oracle == "always":  # Mbpp/164: EvalPlus accepts any returned value
                data = None
            else:
                if oracle == "not_none":  # EvalPlus compares bools as they are, others by `is not None`
                    out = out if type(out) is bool else out is not None
                data = _plain_bytes(out)
                mine = _digest(data)
        finally:
            _disarm()
    except _CpuTimeout:
        return _fail(p, i, FAIL_TIMEOUT, f"exceeded {limit:.2f}s of CPU time" + (" (converting the output)" if converting else ""))
    except _Unsupported as exc:
        return _fail(p, i, FAIL_UNSUPPORTED, str(exc))
    except BaseException as exc:
        return _fail(p, i, FAIL_EXCEPTION, ("while converting the output: " if converting else "") + _describe(exc))
    if data is None:
        _write_record(3, REC_JUDGED, str(p), str(i))
        return True
    if oracle != "poly_root" and mine == digest:
        _write_record(3, REC_PASS, str(p), str(i), mine)
        return True
    plain = marshal.loads(data)
    expected = None
    if oracle != "poly_root":
        _write_record(3, REC_QUERY, str(p), str(i))
        expected = marshal.loads(zlib.decompress(_read_frame(4)))
    try:
        reason = _judge(plain, expected, oracle_args, oracle, atol, oracle_module)
    except Exception as exc:  # e.g. set() of unhashable elements, arithmetic on a string
        reason = f"the comparison raised {type(exc).__name__}: expected {_short(expected)}, got {_short(plain)}"
    if reason is None:
        _write_record(3, REC_JUDGED, str(p), str(i))
        return True
    return _fail(p, i, FAIL_WRONG, reason)


def _record_phases(job: dict, suite: dict) -> None:
    """Trusted run of a canonical solution: every output with its CPU time, digest and value."""
    entry_point, oracle = suite["entry_point"], suite["oracle"]
    for p, phase in enumerate(suite["phases"]):
        fn = _define(job["code"], entry_point, p, phase["budget"])
        if fn is None:
            return
        for i, args in enumerate(phase["inputs"]):
            try:
                started = time.process_time()
                out = fn(*args)
                if oracle == "not_none":  # as EvalPlus's trusted_exec(output_not_none=True)
                    out = out is not None
                data = _plain_bytes(out)
                digest = _digest(data)
                cpu = time.process_time() - started  # what _test_one's limit covers
            except BaseException as exc:
                _fail(p, i, FAIL_EXCEPTION, _describe(exc))
                return
            blob = zlib.compress(data, 1)
            _write_record(3, REC_RESULT, str(p), str(i), f"{cpu:.9f}", digest, str(len(blob)))
            _write_all(3, blob)
    _write_record(3, REC_MEMORY, str(_peak_address_space()))


def _fail(p: int, i: int, kind: str, reason: str) -> bool:
    _write_record(3, REC_FAIL, str(p), str(i), kind, _one_line(reason))
    return False


def _raise_cpu_timeout(signum, frame):
    raise _CpuTimeout


def _arm(seconds: float) -> None:
    # Repeats every 50 ms in case the program swallows the exception; RLIMIT_CPU ends it otherwise.
    _signal.setitimer(_signal.ITIMER_PROF, max(seconds, 0.001), 0.05)


def _disarm() -> None:
    _signal.setitimer(_signal.ITIMER_PROF, 0, 0)


# Plain data -------------------------------------------------------------------------------------

_SCALAR_TYPE_IDS = frozenset(map(id, (type(None), bool, int, float, complex, str, bytes)))


def _plain_bytes(out) -> bytes:
    """``marshal`` bytes of ``out`` as plain data; raises _Unsupported for anything else.

    ``marshal`` serializes exact builtin types only and runs no Python code, so it doubles as a
    fast type check. Objects exposing the buffer protocol are serialized as their bytes, which is
    safe: they are then compared by value. Numpy scalars (which ``==`` compares by value in
    EvalPlus) and the standard dict subclasses go through :func:`_to_plain` first.
    """
    if "numpy" not in sys.modules:
        try:
            return marshal.dumps(out, MARSHAL_VERSION)
        except ValueError:
            pass
    return marshal.dumps(_to_plain(out, 0), MARSHAL_VERSION)


def _to_plain(x, depth: int):
    kind = type(x)
    if id(kind) in _SCALAR_TYPE_IDS:
        return x
    if depth > 1000:
        raise _Unsupported("returned an object nested more than 1000 levels deep")
    if kind is list:
        return [_to_plain(v, depth + 1) for v in x]
    if kind is tuple:
        return tuple([_to_plain(v, depth + 1) for v in x])
    if kind is set or kind is frozenset:
        return kind([_to_plain(v, depth + 1) for v in x])
    collections = sys.modules.get("collections")
    if kind is dict or (
        collections is not None
        and (kind is collections.Counter or kind is collections.OrderedDict or kind is collections.defaultdict)
    ):
        return {_to_plain(k, depth + 1): _to_plain(v, depth + 1) for k, v in dict.items(x)}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.generic) and not isinstance(x, numpy.ndarray):
        return _to_plain(x.item(), depth + 1)
    raise _Unsupported(f"returned an object of type {_type_name(kind)}, not plain data")


def _type_name(kind) -> str:
    """The qualified name of a type, read without running code the program may have attached to it."""
    try:
        name = type.__dict__["__qualname__"].__get__(kind, type)
        module = type.__dict__["__module__"].__get__(kind, type)
    except Exception:
        return "<unnamed type>"
    name = name if type(name) is str else "?"
    return name if type(module) is not str or module == "builtins" else f"{module}.{name}"


def _describe(exc: BaseException) -> str:
    name = _type_name(type(exc))
    try:
        _arm(1.0)  # str() runs the program's code
        try:
            text = str(exc)
        finally:
            _disarm()
    except BaseException:
        return name
    return f"{name}: {text}" if text else name


def _digest(data: bytes) -> str:
    return blake2b(data, digest_size=16).hexdigest()


# EvalPlus's comparison -----------------------------------------------------------------------

_ORACLES_READING_INPUT = frozenset({"surface_area", "digit_distance", "poly_root"})


def _judge(out, expected, args, oracle, atol, oracle_module) -> str | None:
    """EvalPlus 0.3.1's check (``evalplus.eval.unsafe_execute``) on plain values; None when it passes.

    Deviations: the find_zero oracle passes when ``|poly(xs, out)| <= atol`` (0.3.1 ``continue``s
    before recording the pass, so it fails every sample, the canonical solution included; fixed
    upstream after the release); oracles read the input as given, not as mutated by the program;
    and the float tolerance EvalPlus enables on a float output stays scoped to that input (in 0.3.1
    it leaks to the following inputs, which changes no verdict for plain values).
    """
    if oracle == "poly_root":  # HumanEval/32
        value = abs(oracle_module._poly(*args, out))
        return None if value <= atol else f"|poly(xs, {_short(out)})| = {value:.3g} > {atol}"
    exact = out == expected
    if oracle == "set_eq":
        exact = set(out) == set(expected)
    elif oracle == "or_zero":  # Mbpp/295
        exact = exact or out == 0
    elif oracle == "surface_area":  # Mbpp/581
        exact = exact or abs(out - oracle_module._surface_Area(*args)) <= atol
    elif oracle == "digit_distance":  # Mbpp/558
        exact = exact or out == oracle_module._digit_distance_nums(*args)
    if atol == 0 and _is_floats(expected):
        atol = 1e-6
    if exact or atol == 0:
        return None if exact else f"expected {_short(expected)}, got {_short(out)}"
    if type(out) is not type(expected):
        return f"expected {_short(expected)}, got {_short(out)} (type {type(out).__name__})"
    if isinstance(expected, (list, tuple)) and len(out) != len(expected):
        return f"expected {len(expected)} items, got {len(out)}"
    if _allclose(out, expected, atol):
        return None
    return f"expected {_short(expected)} within atol={atol}, got {_short(out)}"


def _is_floats(x) -> bool:
    """``evalplus.eval.is_floats`` for plain values."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _allclose(out, expected, atol: float, rtol: float = 1e-07) -> bool:
    """``numpy.allclose(out, expected, rtol=1e-07, atol=atol)`` for plain values.

    Like numpy: elementwise over equally shaped (nested) sequences of numbers, NaN never close,
    infinities close only to themselves, anything non-numeric not comparable (numpy raises, which
    EvalPlus counts as a failure). Unlike numpy, shapes must match exactly (no broadcasting).
    """
    if isinstance(out, (list, tuple)) or isinstance(expected, (list, tuple)):
        if not (isinstance(out, (list, tuple)) and isinstance(expected, (list, tuple))):
            return False
        return len(out) == len(expected) and all(_allclose(a, b, atol, rtol) for a, b in zip(out, expected))
    numbers = (bool, int, float, complex)
    if not (isinstance(out, numbers) and isinstance(expected, numbers)):
        return False
    if out != out or expected != expected:
        return False
    if abs(out) == float("inf") or abs(expected) == float("inf"):
        return out == expected
    return abs(out - expected) <= atol + rtol * abs(expected)


def _short(value, limit: int = 120) -> str:
    """A bounded repr of a plain value (huge ints and strings are not converted in full)."""
    if type(value) is int and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    if type(value) in (str, bytes) and len(value) > limit:
        return repr(value[:limit]) + f"...(+{len(value) - limit})"
    if type(value) in (list, tuple, set, frozenset, dict) and len(value) > 8:
        items = list(value.items() if type(value) is dict else value)[:8]
        return f"{type(value).__name__} of {len(value)} items starting {_short(items, limit)}"
    if type(value) in (list, tuple, set, frozenset, dict):
        parts = [_short(v, limit // 2) for v in (value.items() if type(value) is dict else value)]
        text = ", ".join(parts)
        text = {list: "[{}]", tuple: "({})", set: "{{{}}}", frozenset: "frozenset({{{}}})", dict: "dict({})"}[
            type(value)
        ].format(text)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# Protections inside the worker -------------------------------------------------------------------


def _load_oracle_module(path: str):
    """EvalPlus's ``_special_oracle.py``, loaded by path (importing evalplus would pull in numpy)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evalplus_special_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drop_privileges(uid: int, read_all: bool) -> None:
    """Becomes ``uid`` (and gid ``uid``, no supplementary groups).

    With ``read_all`` the worker keeps CAP_DAC_READ_SEARCH and nothing else: it can read every file
    (needed when the interpreter lives in a private directory and no mount namespace can expose
    it) but still writes, signals and forks as an unprivileged user.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    if read_all:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if read_all:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        only_read_search = 1 << 2  # CAP_DAC_READ_SEARCH
        data = (ctypes.c_uint32 * 6)(only_read_search, only_read_search, 0, 0, 0, 0)  # effective, permitted, inheritable
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
        libc.prctl(8, 0, 0, 0, 0)


def _set_no_new_privs() -> bool:
    """Setuid binaries and file capabilities cannot raise the worker's privileges again."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    except (OSError, AttributeError):
        return False


def _block_sockets() -> None:
    """Fallback without a network namespace: refuse to create sockets (a program using ctypes
    could still get one; only the namespace is a real barrier)."""
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError(13, "network access is disabled in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)


def _guard_process_calls() -> None:
    """Last resort without a PID namespace or a separate uid (EvalPlus's reliability_guard idea):
    the program could otherwise signal the harness, which runs as the same user. Bypassable."""
    import subprocess

    def refuse(*args, **kwargs):
        raise PermissionError(1, "process control is disabled in the sandbox")

    for name in ("kill", "killpg", "system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse


def _peak_address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    return 0


# Mounts (init, root in the new mount namespace) ------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_MOVE, _MS_REC = 1024, 2048, 4096, 8192, 16384
_MS_PRIVATE, _MS_RELATIME = 1 << 18, 1 << 21
# statvfs flag -> mount flag; a bind remount must repeat these (they are locked in a user namespace).
_KEPT_FLAGS = ((2, _MS_NOSUID), (4, _MS_NODEV), (8, _MS_NOEXEC), (1024, _MS_NOATIME), (2048, _MS_NODIRATIME), (4096, _MS_RELATIME))
_PRIVATE_MOUNTS = ("/tmp", "/dev/shm", "/run")
_UNTOUCHED_MOUNT_ROOTS = ("/proc", "/sys", "/dev")  # kernel filesystems: left as they are


def _setup_mounts(box: dict) -> dict:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target, fstype, flags, data=None):
        encode = lambda s: None if s is None else s.encode()  # noqa: E731
        if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), target)

    # The host's /proc still shows this process under its pid outside the namespace: the harness
    # waits for that process, because the namespace is empty once it has exited.
    host_pid = int(os.readlink("/proc/self"))
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # The private /tmp would hide an interpreter, venv or package that lives under /tmp (a checkout in
    # /tmp/x): hold those directories open, cover /tmp, and bind them back at their paths (read-only below).
    kept = [os.path.realpath(p) for p in box["keep_paths"]]
    kept = [p for p in dict.fromkeys(kept) if p.startswith("/tmp/") and os.path.isdir(p)]
    held = [os.open(p, os.O_PATH) for p in kept]
    mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={box['tmpfs_size_mb']}m,mode=1777")
    for path, fd in zip(kept, held):
        os.makedirs(path, 0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={box['tmpfs_size_mb']}m,mode=1777")
    if os.path.isdir("/run"):  # hides the host's unix sockets (read-only files can still be connected to)
        mount("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    for k, (hidden_dir, components) in enumerate(box["expose"]):
        # Cover a private directory (e.g. /root, mode 700) with an empty world-readable tmpfs and
        # bind back only the subdirectories the interpreter needs, at their original paths.
        stages = []
        for j, component in enumerate(components):
            stage = f"/tmp/.expose-{k}-{j}"
            os.mkdir(stage, 0o700)
            mount(os.path.join(hidden_dir, component), stage, None, _MS_BIND | _MS_REC)
            stages.append(stage)
        mount("tmpfs", hidden_dir, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
        for component, stage in zip(components, stages):
            target = os.path.join(hidden_dir, component)
            os.mkdir(target, 0o755)
            mount(stage, target, None, _MS_MOVE)
            os.rmdir(stage)
    os.mkdir(SCRATCH_IN_NAMESPACE, 0o700)
    if box["owner"] is not None:
        os.chown(SCRATCH_IN_NAMESPACE, box["owner"], box["owner"])
    still_writable = []
    with open("/proc/self/mountinfo") as mountinfo:
        mount_points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo]
    for point in dict.fromkeys(mount_points):
        if point in _PRIVATE_MOUNTS or any(
            point == root or point.startswith(root + "/") for root in _UNTOUCHED_MOUNT_ROOTS
        ):
            continue
        try:
            flags = os.statvfs(point).f_flag
            kept = sum(mount_flag for stat_flag, mount_flag in _KEPT_FLAGS if flags & stat_flag)
            mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept)
        except OSError:
            still_writable.append(point)
    if "/" in still_writable:
        raise OSError(30, "could not remount the root filesystem read-only", "/")
    return {"host_pid": host_pid, "not_read_only": ",".join(still_writable)}


# Plumbing ---------------------------------------------------------------------------------------


def _read_frame(fd: int) -> bytes:
    size = int.from_bytes(_read_exact(fd, _FRAME_HEADER), "big")
    return _read_exact(fd, size)


def _read_exact(fd: int, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError("the harness closed the control pipe")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_record(fd: int, kind: str, *fields: str) -> None:
    _write_all(fd, "\t".join((kind,) + fields).encode("utf-8", "replace") + b"\n")


def _one_line(text: str, limit: int = REASON_CHARS) -> str:
    text = text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# === harness side === (below this line: never compiled into the child; see _child_code)


import ast  # noqa: E402
import fcntl  # noqa: E402
from pathlib import Path  # noqa: E402
import pwd  # noqa: E402
import queue  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import cached_property, lru_cache  # noqa: E402

from eval.errors import HarnessError  # noqa: E402

PASS, FAIL, TIMEOUT, ERROR = "pass", "fail", "timeout", "error"
_HARNESS_SIDE = "\n# === harness side ==="
# Reads the child's code object (one frame on stdin) and runs it.
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
child = {"__name__": "spa_sandbox_child"}
exec(marshal.loads(read(int.from_bytes(read(8), "big"))), child)
child["_child_main"]()
"""
# Environment of the child: nothing inherited (no tokens, no PYTHONPATH); a fixed hash seed so that
# set iteration order, hence e.g. list(set_of_strings), is the same in every run.
CHILD_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
UID_BLOCK = 256  # uids per Sandbox: one per worker slot
UID_BLOCKS = 1000
_MAX_LINE = 1 << 16  # longest record accepted from a child
_MAX_TEST_OUTPUT = 64 << 20  # total bytes accepted from a child in test mode


class SandboxError(HarnessError):
    """The sandbox itself could not run (not a verdict about a program)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Protections and resource limits; ``configs/executor/default.yaml`` documents each field."""

    namespaces: bool = True
    drop_privileges: bool = True
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
    oracle: str | None = None  # see _judge: set_eq, not_none, or_zero, surface_area, ...
    atol: float = 0.0
    memory_limit: int | None = None  # bytes of address space; None: SandboxConfig.memory_limit_mb
    oracle_file: str | None = None  # EvalPlus's _special_oracle.py, for the oracles that call it

    @cached_property
    def payload(self) -> bytes:
        """The suite as the child reads it (marshal: plain data only), built once per task."""
        return _frame(
            marshal.dumps(
                {
                    "entry_point": self.entry_point,
                    "oracle": self.oracle,
                    "atol": float(self.atol),
                    "oracle_file": self.oracle_file,
                    "phases": [
                        {
                            "inputs": list(ph.inputs),
                            "budget": ph.cpu_budget,
                            "cpu_limits": list(ph.cpu_limits),
                            "digests": list(ph.digests),
                        }
                        for ph in self.phases
                    ],
                }
            )
        )


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
    peak_memory: int = 0


@dataclass(frozen=True)
class Protections:
    """What the sandbox enforces on this machine (probed once per configuration)."""

    namespaces: str | None  # "root" | "user" (user namespace) | None
    uid_drop: bool
    read_all: bool  # the dropped uid keeps CAP_DAC_READ_SEARCH to reach a private interpreter
    expose: tuple[tuple[str, tuple[str, ...]], ...]  # private directories to cover (see init)
    sys_path: tuple[str, ...]
    notes: tuple[str, ...] = ()
    config: SandboxConfig = field(default_factory=SandboxConfig)

    def summary(self) -> dict:
        """JSON-ready description for result files."""
        cfg = self.config
        isolated = self.namespaces is not None
        return {
            "processes": "private PID namespace: everything the program starts dies with it"
            if isolated
            else "own process group" + (", stragglers killed by uid" if self.uid_drop else " (stragglers can escape)"),
            "network": "private network namespace (no interfaces up)"
            if isolated
            else "socket creation refused in-process (bypassable)",
            "filesystem": "all mounts read-only; private size-capped tmpfs scratch as cwd, HOME and TMPDIR"
            + (f"; {', '.join(d for d, _ in self.expose)} hidden" if self.expose else "")
            if isolated
            else "fresh scratch dir as cwd, HOME and TMPDIR; elsewhere "
            + ("file permissions of an unprivileged uid" if self.uid_drop else "nothing (same user as the harness)"),
            "user": f"dropped to a uid of its own (from {cfg.sandbox_uid_base} on), no_new_privs"
            + (", may read every file (CAP_DAC_READ_SEARCH: the interpreter is in a private directory)" if self.read_all else "")
            if self.uid_drop
            else ("root of a user namespace" if self.namespaces == "user" else "the harness's own user"),
            "limits": {
                "cpu": "per input: max(min_time_limit, factor x canonical CPU time); RLIMIT_CPU backstop",
                "wall": f"{cfg.wall_factor} x CPU limit + {cfg.wall_slack_s}s (kills the process group)",
                "address_space_mb": cfg.memory_limit_mb,
                "file_size_mb": cfg.file_size_limit_mb,
                "tmpfs_mb": cfg.tmpfs_size_mb if isolated else None,
                "processes": cfg.max_processes if self.uid_drop else None,
            },
            "environment": "allowlist: " + ", ".join(sorted(CHILD_ENVIRONMENT)) + ", HOME, TMPDIR",
            "degraded": list(self.notes),
        }


class Sandbox:
    """Runs programs in contained child processes; thread-safe, at most ``n_workers`` at a time."""

    def __init__(self, config: SandboxConfig | None = None, n_workers: int | None = None):
        self.config = config or SandboxConfig()
        self.n_workers = min(n_workers or os.cpu_count() or 1, UID_BLOCK)
        self.protections = probe(self.config)
        # Each worker slot runs as its own uid, from a block no other Sandbox (in any process) holds:
        # samples running side by side cannot signal each other or share a process limit.
        first_uid, self._uid_lock = _reserve_uid_block(self.config.sandbox_uid_base)
        weakref.finalize(self, os.close, self._uid_lock)
        self.uids = tuple(range(first_uid, first_uid + self.n_workers))  # used when uid_drop is on
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for uid in self.uids:
            self._slots.put(uid)

    def run(self, code: str, suite: Suite, expected_blob: Callable[[int, int], bytes]) -> list[PhaseVerdict]:
        """Verdict of each phase of ``suite`` for ``code``. ``expected_blob(p, i)`` gives the
        canonical output of input i of phase p (compressed marshal bytes) for tolerant checks."""
        verdicts: list[PhaseVerdict] = []
        while len(verdicts) < len(suite.phases):
            # Phases are independent, as in EvalPlus: after a child died mid-way, a fresh one runs the rest.
            child = _ChildRun(self.protections, code, suite, len(verdicts), False, expected_blob)
            verdicts += self._with_slot(child.run)
        return verdicts

    def record(self, code: str, suite: Suite) -> Recording | PhaseVerdict:
        """Runs trusted code and records its outputs, or returns the verdict explaining its failure."""
        child = _ChildRun(self.protections, code, suite, 0, True, None)
        failed = [v for v in self._with_slot(child.run) if v.status != PASS]
        return failed[0] if failed else child.recording

    def _with_slot(self, work):
        uid = self._slots.get()
        try:
            return work(uid)
        finally:
            self._slots.put(uid)


class _ChildRun:
    """One child process: start it, feed it, watch it, turn its records into phase verdicts."""

    def __init__(self, protections: Protections, code: str, suite: Suite, first_phase: int, record: bool, expected_blob):
        self.protections, self.cfg = protections, protections.config
        self.code, self.suite, self.first_phase, self.record = code, suite, first_phase, record
        self.expected_blob = expected_blob
        self.cpu_limit = int(sum(ph.cpu_budget for ph in suite.phases[first_phase:])) + 5
        self.verdicts: list[PhaseVerdict] = []
        self.recording = Recording([], [], [])
        self.phase, self.index = first_phase, -1  # what the program is doing; index -1: defining
        self.setup_seen = self.worker_ready = self.stopped = False
        self.queried = -1  # input whose expected value was sent: only it may be judged by the child
        self.setup_error: str | None = None
        self.worker_exit: tuple[int, float] | None = None
        self.init_pidfd: int | None = None  # the namespace's init, seen from the harness
        self.setup_facts: dict[str, str] = {}

    @property
    def done(self) -> bool:
        return self.phase >= len(self.suite.phases)

    def run(self, slot_uid: int) -> list[PhaseVerdict]:
        protections = self.protections
        uid = slot_uid if protections.uid_drop else None
        scratch = SCRATCH_IN_NAMESPACE
        if protections.namespaces is None:
            scratch = tempfile.mkdtemp(prefix="spa-sandbox-")
            if uid is not None:
                os.chown(scratch, uid, uid)
        job = {
            "code": self.code,
            "first_phase": self.first_phase,
            "record": self.record,
            "uid": uid,
            "scratch": scratch,
            "cpu_limit": self.cpu_limit,
            "memory_limit": None if self.record else (self.suite.memory_limit or self.cfg.memory_limit_mb << 20),
            "sandbox": {
                "mount_namespace": protections.namespaces is not None,
                "pid_namespace": protections.namespaces is not None,
                "tmpfs_size_mb": self.cfg.tmpfs_size_mb,
                "expose": [list(e) for e in protections.expose],
                "owner": uid,
                "file_size_limit": self.cfg.file_size_limit_mb << 20,
                "max_processes": self.cfg.max_processes,
                "sys_path": list(protections.sys_path),
                # What the child reads after /tmp is covered: its import path and the oracle's file.
                "keep_paths": [*protections.sys_path, *([os.path.dirname(self.suite.oracle_file)] if self.suite.oracle_file else [])],
                "read_all": protections.read_all,
                "block_sockets": protections.namespaces is None,
                "guard": protections.namespaces is None and not protections.uid_drop,
            },
        }
        process = subprocess.Popen(
            _child_command(protections.namespaces),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(CHILD_ENVIRONMENT, HOME=scratch, TMPDIR=scratch),
            cwd="/",
            start_new_session=True,  # its own process group, which _kill_group takes down
            close_fds=True,
        )
        stderr_tail = bytearray()
        try:
            self._converse(process, _child_code() + _frame(marshal.dumps(job)) + self.suite.payload, stderr_tail)
        finally:
            _kill_group(process)
            for pipe in (process.stdin, process.stdout, process.stderr):
                pipe.close()
            if self.init_pidfd is not None:
                # Killing init makes the kernel kill the rest of the namespace; init counts as
                # exited only once they are all gone. So nothing the program started outlives run().
                select.select([self.init_pidfd], [], [], 30)
                os.close(self.init_pidfd)
            if protections.namespaces is None:
                if uid is not None:
                    _kill_uid(uid)
                shutil.rmtree(scratch, ignore_errors=True)
        if not self.setup_seen or (not self.worker_ready and not self.stopped):
            detail = self.setup_error or bytes(stderr_tail).decode(errors="replace").strip()[-800:]
            raise SandboxError(
                f"The sandbox failed to start a child process (exit status {process.returncode}): {detail}. "
                "Check that the interpreter and `unshare` work on this machine, or set "
                "executor.sandbox.namespaces=false."
            )
        if not self.done and not self.stopped:
            self._stop_from_exit(process.returncode)
        return self.verdicts

    def _converse(self, process: subprocess.Popen, payload: bytes, stderr_tail: bytearray) -> None:
        out_fd, err_fd, in_fd = process.stdout.fileno(), process.stderr.fileno(), process.stdin.fileno()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        if not _send(in_fd, payload, deadline):
            return
        poller = select.poll()
        poller.register(out_fd, select.POLLIN)
        poller.register(err_fd, select.POLLIN)
        buffer = bytearray()
        received, open_fds = 0, 2
        while open_fds:
            events = poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
            if not events:
                if not self.done:
                    self._stop(TIMEOUT, self._wall_reason())
                return
            for fd, _ in events:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    poller.unregister(fd)
                    open_fds -= 1
                elif fd == err_fd:
                    stderr_tail += chunk
                    del stderr_tail[:-4096]
                else:
                    received += len(chunk)
                    if not self.record and received > _MAX_TEST_OUTPUT:
                        self._stop(ERROR, "the program flooded the result pipe (more than 64 MiB)")
                        return
                    buffer += chunk
                    if not self._consume(buffer, in_fd) or self.done:
                        return  # after the last phase, what is left of the child is killed
                    deadline = self._step_deadline()

    def _consume(self, buffer: bytearray, in_fd: int) -> bool:
        """Handles the complete records in ``buffer``; False when the run must stop."""
        while True:
            end = buffer.find(b"\n", 0, _MAX_LINE + 1)
            if end < 0:
                if len(buffer) > _MAX_LINE:
                    self._stop(ERROR, "the program broke the result protocol (overlong record)")
                    return False
                return True
            fields = bytes(buffer[:end]).decode("utf-8", "replace").split("\t")
            try:
                blob = None
                if fields[0] == REC_RESULT and self.record:
                    size = int(fields[5])
                    if len(buffer) < end + 1 + size:
                        return True  # wait for the rest of the blob
                    blob = bytes(buffer[end + 1 : end + 1 + size])
                    del buffer[: end + 1 + size]
                else:
                    del buffer[: end + 1]
                if not self._handle(fields, blob, in_fd):
                    return False
            except (ValueError, IndexError) as exc:
                self._stop(ERROR, f"the program broke the result protocol ({exc})")
                return False

    def _handle(self, fields: list[str], blob: bytes | None, in_fd: int) -> bool:
        kind = fields[0]
        if not self.setup_seen:
            if kind != REC_SETUP:
                raise ValueError(f"record {kind!r} before setup")
            self.setup_facts = dict(item.partition("=")[::2] for item in fields[1:])
            if "error" in self.setup_facts:
                self.setup_error = "mount setup failed: " + self.setup_facts["error"]
                return False
            self.setup_seen = True
            if "host_pid" in self.setup_facts:
                try:
                    self.init_pidfd = os.pidfd_open(int(self.setup_facts["host_pid"]))
                except OSError:  # already gone
                    pass
            return True
        if kind == REC_EXIT:
            self.worker_exit = (int(fields[1]), float(fields[2]))
            return True
        if not self.worker_ready:
            # Before W only the executor's own code has run, so a failure here is the sandbox's.
            if kind == REC_FAIL and fields[3] == "setup":
                self.setup_error = "worker setup failed: " + fields[4]
                return False
            if kind != REC_WORKER:
                raise ValueError(f"record {kind!r} before the worker was ready")
            self.worker_ready = True
            return True
        if kind == REC_END:
            if not self.done:
                raise ValueError("end record before all phases ran")
            return True
        if kind == REC_MEMORY and self.record:
            self.recording.peak_memory = int(fields[1])
            return True
        p = int(fields[1])
        if p != self.phase:
            raise ValueError(f"record for phase {p} while phase {self.phase} runs")
        if kind == REC_DEFINED:
            if self.index != -1:
                raise ValueError("phase defined twice")
            self.index = 0
            if self.record:
                for column in (self.recording.cpu_times, self.recording.digests, self.recording.blobs):
                    column.append([])
            self._phase_passed_if_complete()
            return True
        i = int(fields[2])
        if i != self.index:
            raise ValueError(f"record for input {i} while input {self.index} runs")
        if kind == REC_FAIL:
            status = TIMEOUT if fields[3] == FAIL_TIMEOUT else FAIL
            self._close_phase(PhaseVerdict(status, None if i < 0 else i, _one_line(fields[4])))
            return True
        if i < 0:
            raise ValueError(f"record {kind!r} while defining")
        phase = self.suite.phases[p]
        if self.record:
            if kind != REC_RESULT:
                raise ValueError(f"unexpected record {kind!r}")
            self.recording.cpu_times[-1].append(float(fields[3]))
            self.recording.digests[-1].append(fields[4])
            self.recording.blobs[-1].append(blob)
        elif kind == REC_PASS:
            if fields[3] != phase.digests[i]:
                raise ValueError(f"input {i} claimed a pass with a wrong digest")
        elif kind == REC_QUERY:
            # The child waits for the canonical output of input i to compare with tolerance.
            self.queried = i
            if not _send(in_fd, _frame(self.expected_blob(p, i)), time.monotonic() + self.cfg.startup_timeout_s):
                self._stop(ERROR, "the program did not read the expected output it asked for")
                return False
            return True
        elif kind == REC_JUDGED:
            if self.queried != i and self.suite.oracle not in ("always", "poly_root"):
                raise ValueError(f"input {i} judged without its expected output")
        else:
            raise ValueError(f"unexpected record {kind!r}")
        self.index += 1
        self._phase_passed_if_complete()
        return True

    def _phase_passed_if_complete(self) -> None:
        if self.index == len(self.suite.phases[self.phase].inputs):
            self._close_phase(PhaseVerdict(PASS))

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
        """The child ended in the middle of a phase: how (CPU limit, signal, exit)."""
        code, cpu = self.worker_exit or (returncode, 0.0)
        if code < 0 and -code in (signal.SIGXCPU, signal.SIGKILL) and cpu >= self.cpu_limit - 0.5:
            self._stop(TIMEOUT, f"exceeded the process CPU-time limit ({cpu:.1f}s)")
        elif code < 0:
            self._stop(ERROR, f"the process was killed by {_signal_name(-code)}")
        else:
            self._stop(ERROR, f"the process exited with status {code} before finishing")

    def _step_deadline(self) -> float:
        return time.monotonic() + self.cfg.wall_factor * self._cpu_allowance() + self.cfg.wall_slack_s

    def _cpu_allowance(self) -> float:
        """CPU seconds of the step now running, from which its wall-clock backstop is derived."""
        phase = self.suite.phases[self.phase]
        return phase.cpu_budget if self.index < 0 or self.record else phase.cpu_limits[self.index]

    def _wall_reason(self) -> str:
        if not self.worker_ready:
            return f"the sandbox did not start within {self.cfg.startup_timeout_s:.0f}s"
        return (
            f"exceeded the wall-clock limit of {self.cfg.wall_factor:g} x {self._cpu_allowance():.2f}s "
            f"+ {self.cfg.wall_slack_s:g}s while using little CPU time (sleeping or blocked)"
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_FRAME_HEADER, "big") + data


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
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except (BrokenPipeError, OSError):
            return False
    return True


def _kill_group(process: subprocess.Popen) -> None:
    """Kills the child's process group, then reaps the child (not before: until it is reaped its pid
    keeps the group id from being reused by an unrelated group)."""
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


def _kill_uid(uid: int) -> None:
    """Without a PID namespace: kills every process left running as the slot's uid."""
    kill = shutil.which("kill")
    if kill:
        subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/", check=False)


@lru_cache(maxsize=None)
def _child_code() -> bytes:
    """The child half of this file as a framed, marshalled code object (compiled once)."""
    source = Path(__file__).read_text()
    code = compile(source[: source.index(_HARNESS_SIDE)], __file__, "exec")
    return _frame(marshal.dumps(code))


def _child_command(namespaces: str | None) -> list[str]:
    python = [sys.executable, "-S", "-s", "-B", "-c", _BOOTSTRAP]
    if namespaces is None:
        return python
    user = ["--user", "--map-root-user"] if namespaces == "user" else []
    return [shutil.which("unshare") or "unshare", *user, "--net", "--pid", "--mount", "--fork", "--kill-child", "--", *python]


# Probing -----------------------------------------------------------------------------------------

_probed: dict[SandboxConfig, Protections] = {}
_probe_lock = threading.Lock()


def probe(config: SandboxConfig) -> Protections:
    """The protections available here for ``config``, found by running a trivial program (cached)."""
    with _probe_lock:
        if config not in _probed:
            _probed[config] = _probe(config)
        return _probed[config]


def _probe(config: SandboxConfig) -> Protections:
    notes: list[str] = []
    sys_path = tuple(_interpreter_paths())
    root = os.geteuid() == 0
    if not root:
        notes.append("not running as root: the program runs as the harness's user (no separate uid, no process limit)")
    elif not config.drop_privileges:
        notes.append("executor.sandbox.drop_privileges=false: the program runs as root")
    candidates: list[str | None] = []
    if not config.namespaces:
        notes.append("executor.sandbox.namespaces=false")
    elif not shutil.which("unshare"):
        notes.append("util-linux `unshare` not found: no PID, network or mount namespaces")
    else:
        candidates.append("root" if root else "user")
    candidates.append(None)
    uid_drop = root and config.drop_privileges
    if uid_drop:
        taken = [u for u in range(config.sandbox_uid_base, config.sandbox_uid_base + 4 * UID_BLOCK) if _uid_has_account(u)]
        if taken:
            notes.append(f"uid {taken[0]} belongs to an account; set executor.sandbox.sandbox_uid_base")
    for namespaces in candidates:
        expose, unreadable = _exposure_plan(sys_path, namespaces is not None)
        read_all = uid_drop and unreadable is not None
        protections = Protections(namespaces, uid_drop, read_all, tuple(expose) if uid_drop else (), sys_path, (), config)
        failure, facts = _try(protections)
        if failure is None:
            if facts.get("not_read_only"):
                notes.append(f"could not remount read-only: {facts['not_read_only']}")
            if read_all:
                notes.append(
                    f"{unreadable} is not readable by other users and no mount namespace can expose it: the "
                    "program may read every file (install Python outside a private home directory to avoid this)"
                )
            return Protections(namespaces, uid_drop, read_all, protections.expose, sys_path, tuple(notes), config)
        notes.append(f"namespaces unavailable ({failure})" if namespaces else f"sandbox failed: {failure}")
    raise SandboxError("The sandbox cannot run programs on this machine: " + "; ".join(notes))


def _try(protections: Protections) -> tuple[str | None, dict[str, str]]:
    """Runs a trivial program under ``protections``: (None or why it failed, what init reported)."""
    suite = Suite("probe", (Phase("probe", [[]], cpu_budget=5.0),))
    child = _ChildRun(protections, "def probe():\n    return 1\n", suite, 0, True, None)
    first_uid, lock = _reserve_uid_block(protections.config.sandbox_uid_base)
    try:
        result = child.run(first_uid)
    except SandboxError as exc:
        return str(exc), child.setup_facts
    finally:
        os.close(lock)
    return (None if result[0].status == PASS else f"probe program failed: {result[0]}"), child.setup_facts


def _interpreter_paths() -> list[str]:
    """The child's import path: the standard library as ``python -S`` finds it, then site-packages
    (without .pth files, the harness's directory or the current directory)."""
    shown = subprocess.run(
        [sys.executable, "-S", "-s", "-B", "-c", "import sys; print(repr(sys.path))"],
        capture_output=True, text=True, env=CHILD_ENVIRONMENT, cwd="/", check=True,
    ).stdout
    site_packages = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    candidates = [p for p in ast.literal_eval(shown) if p] + site_packages
    return [p for p in dict.fromkeys(os.path.realpath(c) for c in candidates) if os.path.isdir(p)]


def _exposure_plan(paths, can_mount: bool) -> tuple[list[tuple[str, tuple[str, ...]]], str | None]:
    """Private directories on the way to ``paths`` (no execute bit for others), each with the
    components to bind back; and a path that no plan can make readable, if any."""
    plan: dict[str, list[str]] = {}
    for path in paths:
        mode = os.stat(path).st_mode
        if not (mode & stat.S_IROTH and mode & stat.S_IXOTH):
            return [], path
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                if not can_mount:
                    return [], path
                components = plan.setdefault(ancestor, [])
                if parts[depth] not in components:
                    components.append(parts[depth])
    return [(directory, tuple(components)) for directory, components in plan.items()], None


def _uid_has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
