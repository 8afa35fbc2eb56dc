"""The child runner: runs one untrusted program inside the sandbox and streams what it returned.

This file runs INSIDE the sandbox, under the untrusted program's control, so it is given nothing worth
stealing and trusted with nothing: no expected outputs, no digests, no oracles, no way to ask for them. It
reads one job (the program, the entry point, the test inputs) from stdin, applies the in-process limits
(address space, file size, core dumps, process count), drops to the slot's uid where the sandbox runs as
root, and for every input calls the entry point and writes the returned value as plain data (``marshal``
bytes of exact builtin types) to fd 3. Everything is judged outside (``eval.execution.judge``); the CPU
and wall-clock limits are measured and enforced outside too (``eval.execution.sandbox``). A program that
tampers with this code can only change the bytes it sends, which it could send anyway.

Standard library only (tests/test_execution.py checks it): the harness ships this file's code object to a
``python -S`` bootstrap, and inside the sandbox nothing but the interpreter is visible.

Records on fd 3, one tab-separated line each (``p`` = phase number, ``i`` = input index):

    W                       limits applied, privileges dropped: the program runs next (the go-ahead
                            pipe, fd 4, then answers every O record in test mode: c go on, n skip the phase)
    D p                     phase p: the program was executed and the entry point found
    O p i n [cpu]           input i returned; n bytes of marshal data follow (n = 0: "always" oracle);
                            cpu: the canonical solution's own CPU seconds (recording only)
    X p i kind reason       phase p failed at input i (-1: while defining): kind is exception or unsupported
    M bytes                 peak address space (recording only)
    E                       all phases done
"""

import marshal
import os
import sys
import time

MARSHAL_VERSION = 2  # no back-references, no interning flags: equal plain values give equal bytes
REASON_CHARS = 300
FRAME_HEADER = 8  # big-endian length prefix of the job frame


class Unsupported(Exception):
    """The program returned an object that is not plain data."""


def main() -> None:
    job = marshal.loads(read_frame(0))
    os.dup2(1, 3, inheritable=False)  # the record pipe; the program's stdio goes to /dev/null
    os.dup2(0, 4, inheritable=False)  # the go-ahead pipe (see run_one)
    null_in, null_out = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
    for fd, target in ((0, null_in), (1, null_out), (2, null_out)):
        os.dup2(target, fd)
    os.close(null_in)
    os.close(null_out)
    apply_limits(job)
    if job["uid"] is not None:
        drop_privileges(job["uid"])
    os.makedirs(job["scratch"], 0o700, exist_ok=True)
    os.chdir(job["scratch"])
    os.environ["HOME"] = os.environ["TMPDIR"] = os.environ["PWD"] = job["scratch"]
    sys.path[:] = job["sys_path"]
    write_record("W", f"uid={os.getuid()}")
    run_phases(job)
    write_record("E")


def apply_limits(job: dict) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    cpu = job["cpu_backstop_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # per process; the harness measures the tree
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_limit"],) * 2)
    if job["address_space"]:
        resource.setrlimit(resource.RLIMIT_AS, (job["address_space"],) * 2)
        # As EvalPlus's reliability_guard does: deep recursion may use the whole allowance.
        resource.setrlimit(resource.RLIMIT_STACK, (job["address_space"],) * 2)
    if job["max_processes"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"],) * 2)


def drop_privileges(uid: int) -> None:
    """Becomes ``uid`` (gid ``uid``, no supplementary groups); bwrap already set no_new_privs."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def run_phases(job: dict) -> None:
    """Every phase: the program executed afresh, then each input; a failure ends its phase."""
    record = job["record"]
    for p, inputs in enumerate(job["phases"], job["first_phase"]):
        fn = define(job["code"], job["entry_point"], p)
        if fn is None:
            continue
        for i, args in enumerate(inputs):
            # A canonical solution's own CPU time per input calibrates the limits (recording only).
            started = time.process_time() if record else None
            if not run_one(fn, args, p, i, job["transform"], started):
                break
            # In test mode the harness answers every output: c (go on) or n (it failed: skip the phase).
            if not record and os.read(4, 1) != b"c":
                break
    if record:
        write_record("M", str(peak_address_space()))


def define(code: str, entry_point: str, p: int):
    """Executes the program in fresh globals (as EvalPlus does per test set); the entry point or None."""
    namespace: dict = {}
    try:
        exec(code, namespace)
        fn = namespace[entry_point]
    except BaseException as exc:
        fail(p, -1, "exception", "while defining the solution: ", exc)
        return None
    write_record("D", str(p))
    return fn


def run_one(fn, args, p: int, i: int, transform, started=None) -> bool:
    """Calls the entry point on one input and sends the output; False when the phase failed there."""
    converting = False
    try:
        out = fn(*args)
        converting = True
        if transform == "always":  # Mbpp/164: EvalPlus accepts any returned value
            data = b""
        else:
            if transform == "not_none":  # EvalPlus compares bools as they are, others by `is not None`
                out = out if type(out) is bool else out is not None
            data = plain_bytes(out)
    except Unsupported as exc:
        return fail(p, i, "unsupported", "", exc)
    except BaseException as exc:
        return fail(p, i, "exception", "while converting the output: " if converting else "", exc)
    fields = [str(p), str(i), str(len(data))]
    if started is not None:
        fields.append(f"{time.process_time() - started:.9f}")
    write_record("O", *fields)
    write_all(data)
    return True


def fail(p: int, i: int, kind: str, prefix: str, exc: BaseException) -> bool:
    # Free what the failing frames hold first (a MemoryError's hoard) so that reporting it cannot fail too.
    exc.__traceback__ = None
    write_record("X", str(p), str(i), kind, one_line(prefix + describe(exc)))
    return False


# Plain data ------------------------------------------------------------------------------------

_SCALAR_TYPES = (type(None), bool, int, float, complex, str, bytes)


def plain_bytes(out) -> bytes:
    """``marshal`` bytes of ``out`` as plain data; raises Unsupported for anything else.

    ``marshal`` serializes exact builtin types only and runs no Python code, so it doubles as a fast type
    check (objects exposing the buffer protocol become their bytes, compared by value). Numpy scalars
    (which EvalPlus's ``==`` compares by value) and the standard dict subclasses are converted first.
    """
    if "numpy" not in sys.modules:
        try:
            return marshal.dumps(out, MARSHAL_VERSION)
        except ValueError:
            pass
    return marshal.dumps(to_plain(out, 0), MARSHAL_VERSION)


def to_plain(x, depth: int):
    kind = type(x)
    if kind in _SCALAR_TYPES:
        return x
    if depth > 1000:
        raise Unsupported("returned an object nested more than 1000 levels deep")
    if kind is list:
        return [to_plain(v, depth + 1) for v in x]
    if kind is tuple:
        return tuple([to_plain(v, depth + 1) for v in x])
    if kind is set or kind is frozenset:
        return kind([to_plain(v, depth + 1) for v in x])
    collections = sys.modules.get("collections")
    if kind is dict or (
        collections is not None
        and (kind is collections.Counter or kind is collections.OrderedDict or kind is collections.defaultdict)
    ):
        return {to_plain(k, depth + 1): to_plain(v, depth + 1) for k, v in dict.items(x)}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.generic) and not isinstance(x, numpy.ndarray):
        return to_plain(x.item(), depth + 1)
    raise Unsupported(f"returned an object of type {type_name(kind)}, not plain data")


def type_name(kind) -> str:
    """The qualified name of a type, read without running code the program may have attached to it."""
    try:
        name = type.__dict__["__qualname__"].__get__(kind, type)
        module = type.__dict__["__module__"].__get__(kind, type)
    except Exception:
        return "<unnamed type>"
    name = name if type(name) is str else "?"
    return name if type(module) is not str or module == "builtins" else f"{module}.{name}"


def describe(exc: BaseException) -> str:
    name = type_name(type(exc))
    try:
        text = str(exc)  # runs the program's code: whatever it does is its own verdict's business
    except BaseException:
        return name
    if type(text) is not str:
        return name
    return f"{name}: {text}" if text else name


def peak_address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    return 0


# Plumbing ---------------------------------------------------------------------------------------


def read_frame(fd: int) -> bytes:
    size = int.from_bytes(read_exact(fd, FRAME_HEADER), "big")
    return read_exact(fd, size)


def read_exact(fd: int, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError("the harness closed the job pipe")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def write_all(data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(3, view):]


def write_record(kind: str, *fields: str) -> None:
    write_all("\t".join((kind,) + fields).encode("utf-8", "replace") + b"\n")


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    text = text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
