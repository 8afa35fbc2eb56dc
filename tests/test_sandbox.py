"""The sandboxed executor on synthetic suites: verdicts, limits, hostile programs, unprivileged and unsandboxed modes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from eval.execution import sandbox as launcher
from eval.execution.sandbox import PhaseVerdict, Phase, Recording, Sandbox, SandboxConfig, SandboxError, Suite

HOSTILE_DIR = Path(__file__).parent / "hostile"
CANONICAL_ADD = "def add(x: int, y: int):\n    return x + y\n"
ADD_INPUTS = {"base": [[1, 2], [3, 4]], "plus": [[5, 6], [10**30, -1], [0, 0]]}
HOST_MARKERS = ("/tmp/spa-hostile-marker", "/var/tmp/spa-hostile-marker", "/dev/shm/spa-hostile-marker",
                "/root/spa-hostile-marker", "/etc/spa-hostile-marker")
# Quick limits: every hostile program costs a fraction of a second of CPU time or wall-clock time.
FAST = dict(memory_limit_mb=1024, wall_factor=2.0, wall_slack_s=0.5)
CPU_LIMIT = 0.5


def make_suite(sandbox: Sandbox, canonical: str, inputs: dict[str, list], *, entry_point="add",
               oracle=None, atol=0.0, cpu_limit=CPU_LIMIT):
    """Records ``canonical`` in the sandbox, then returns the suite testing against its outputs."""
    recording = sandbox.record(canonical, Suite(entry_point, tuple(Phase(n, i, 60.0) for n, i in inputs.items()), oracle=oracle))
    assert isinstance(recording, Recording), recording
    phases = tuple(
        Phase(name, args, cpu_budget=cpu_limit * (len(args) + 1), cpu_limits=(cpu_limit,) * len(args), digests=tuple(recording.digests[p]))
        for p, (name, args) in enumerate(inputs.items())
    )
    return Suite(entry_point, phases, oracle=oracle, atol=atol), (lambda p, i: recording.blobs[p][i])


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(**FAST), n_workers=2)


@pytest.fixture(scope="module")
def add_suite(sandbox):
    return make_suite(sandbox, CANONICAL_ADD, ADD_INPUTS)


def statuses(verdicts: list[PhaseVerdict]) -> list[str]:
    return [v.status for v in verdicts]


def test_correct_program_passes_and_equal_values_of_other_types_pass_like_evalplus(sandbox, add_suite):
    suite, expected = add_suite
    assert statuses(sandbox.run(CANONICAL_ADD, suite, expected)) == ["pass", "pass"]
    # EvalPlus compares with ==, so 3.0 == 3 passes; a numpy scalar compares by value too.
    as_float = "def add(x, y):\n    return float(x + y) if abs(x + y) < 2**53 else x + y\n"
    assert statuses(sandbox.run(as_float, suite, expected)) == ["pass", "pass"]
    numpy_scalar = "import numpy as np\ndef add(x, y):\n    return np.int64(x + y) if abs(x + y) < 2**62 else x + y\n"
    assert statuses(sandbox.run(numpy_scalar, suite, expected)) == ["pass", "pass"]


def test_wrong_programs_fail_at_the_first_failing_input_with_a_reason(sandbox, add_suite):
    suite, expected = add_suite
    off_by_one = sandbox.run("def add(x, y):\n    return x + y + (x == 5)\n", suite, expected)
    assert statuses(off_by_one) == ["pass", "fail"]
    assert off_by_one[1].index == 0 and off_by_one[1].reason == "expected 11, got 12"
    raising = sandbox.run("def add(x, y):\n    if y == 4:\n        raise ValueError('no 4')\n    return x + y\n", suite, expected)
    assert statuses(raising) == ["fail", "pass"]
    assert raising[0].index == 1 and raising[0].reason == "ValueError: no 4"
    as_string = sandbox.run("def add(x, y):\n    return str(x + y)\n", suite, expected)
    assert statuses(as_string) == ["fail", "fail"] and as_string[0].reason == "expected 3, got '3'"
    undefined = sandbox.run("def plus(x, y):\n    return x + y\n", suite, expected)
    assert statuses(undefined) == ["fail", "fail"]
    assert undefined[0].index is None and "KeyError" in undefined[0].reason


def test_float_tolerance_follows_evalplus(sandbox):
    canonical = "def mean(xs):\n    return sum(xs) / len(xs)\n"
    suite, expected = make_suite(sandbox, canonical, {"base": [[[0.1, 0.2, 0.4]]], "plus": [[[1.0, 2.0]]]}, entry_point="mean")
    # is_floats(expected) turns on atol=1e-6 (with numpy.allclose's rtol=1e-7).
    close = "def mean(xs):\n    return sum(xs) / len(xs) + 5e-7\n"
    assert statuses(sandbox.run(close, suite, expected)) == ["pass", "pass"]
    far = "def mean(xs):\n    return sum(xs) / len(xs) + 1e-5\n"
    verdicts = sandbox.run(far, suite, expected)
    assert statuses(verdicts) == ["fail", "fail"] and "atol=1e-06" in verdicts[0].reason


def test_cpu_time_limit_is_per_input_and_the_next_phase_still_runs(sandbox, add_suite):
    suite, expected = add_suite
    slow_on_5 = "def add(x, y):\n    while x == 5:\n        pass\n    return x + y\n"
    verdicts = sandbox.run(slow_on_5, suite, expected)
    assert statuses(verdicts) == ["pass", "timeout"]
    assert verdicts[1].index == 0 and "CPU time" in verdicts[1].reason


def test_crash_in_base_does_not_decide_plus(sandbox, add_suite):
    """EvalPlus runs the two test sets in separate processes; so does the executor after a crash."""
    suite, expected = add_suite
    crash_on_1 = "import os\ndef add(x, y):\n    if x == 1:\n        os._exit(3)\n    return x + y\n"
    verdicts = sandbox.run(crash_on_1, suite, expected)
    assert statuses(verdicts) == ["error", "pass"]
    assert verdicts[0].index == 0 and "status 3" in verdicts[0].reason


def test_program_may_use_its_scratch_dir_which_is_cwd_home_and_tmpdir(sandbox, add_suite):
    suite, expected = add_suite
    program = (
        "import os, tempfile\n"
        "def add(x, y):\n"
        "    assert os.getcwd() == os.environ['HOME'] == tempfile.gettempdir()\n"
        "    with open('scratch.txt', 'w') as f:\n"
        "        f.write(str(x + y))\n"
        "    with open(os.path.join(os.environ['HOME'], 'scratch.txt')) as f:\n"
        "        return int(f.read())\n"
    )
    assert statuses(sandbox.run(program, suite, expected)) == ["pass", "pass"]


def _snapshot(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    } | {".": (root.stat().st_mode, root.stat().st_mtime_ns, None)}


def _live_processes(uids) -> list[int]:
    """Pids of processes running (not zombies: bwrap leaves its exited PID 1 to whatever reaps orphans) as
    one of ``uids``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) in uids and not fields["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


def _sandbox_processes(sandbox: Sandbox) -> list[int]:
    return _live_processes(set(sandbox.uids))


@pytest.fixture
def sentinel_dir(request):
    """A directory the hostile programs try to wreck. With namespaces it is world-writable, so only
    the sandbox's read-only mounts protect it; without, it is root's, protected by the uid drop."""
    world_writable = getattr(request, "param", True)
    root = Path(tempfile.mkdtemp(prefix="spa-sentinel-", dir="/var/tmp"))
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "leaf.txt").write_text("leaf")
    (root / "file.txt").write_text("original")
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) if world_writable else (0o755 if path.is_dir() else 0o644))
    yield root
    shutil.rmtree(root, ignore_errors=True)


HOSTILE_EXPECTED = {
    # program: the statuses it may get (never "pass")
    "segfault": {"error"},
    "os_exit": {"error"},
    "signals": {"fail", "error"},
    "fork_bomb": {"timeout", "fail"},
    "memory_bomb": {"fail", "timeout"},  # MemoryError, unless zero-filling takes longer
    "infinite_loop": {"timeout"},
    "sleeper": {"timeout"},
    "stdout_flood": {"timeout"},
    "deep_recursion": {"fail", "error", "timeout"},
    "files": {"fail"},
    "network": {"fail"},
    "env_secrets": {"fail"},
    "outlive": {"fail"},
    "forge_results": {"error"},
    "eq_always_true": {"fail"},
    "eq_raises": {"fail"},
    "int_subclass": {"fail"},
    "bytes_like": {"fail"},
    # One per class of the executor review's findings:
    "steal_expected": {"fail", "error"},  # the judge's data was in the attacked interpreter
    "forge_output": {"fail", "error"},  # records and malformed bytes written by the program itself
    "answer_key": {"fail"},  # the dataset and ground truth were readable
    "ignore_cpu_timer": {"timeout"},  # the CPU limit was an in-process signal handler
    "spinning_children": {"fail", "timeout"},  # forked children's CPU counted against nothing
    "memory_children": {"fail", "error", "timeout"},  # the address-space limit was per process (see below)
    "keyring": {"fail"},  # kernel keys outlived the sample
    "unix_socket": {"fail"},  # path sockets were reachable
}


@pytest.fixture
def host_socket():
    """A listening unix socket on the host, counting the connections it gets."""
    directory = Path(tempfile.mkdtemp(prefix="spa-socket-", dir="/var/tmp"))
    directory.chmod(0o777)
    path = directory / "listener.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(8)
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, accepted
    stop.set()
    thread.join()
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def _program(name: str, sentinel_dir: Path, socket_path: Path | None = None) -> str:
    text = (HOSTILE_DIR / f"{name}.py").read_text()
    return (text.replace("@SENTINEL_DIR@", str(sentinel_dir)).replace("@SOCKET_PATH@", str(socket_path))
            .replace("@DATA_DIR@", os.environ.get("SPA_DATA_DIR", "/nonexistent")).replace("@PROJECT_DIR@", str(Path(__file__).parent.parent)))


def _run_hostile(sandbox, suite, expected, names, sentinel_dir, monkeypatch, socket_path=None):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_the_program_must_not_see")
    before = _snapshot(sentinel_dir)
    programs = {name: _program(name, sentinel_dir, socket_path) for name in names}
    good = [CANONICAL_ADD] * 4  # interleaved: other samples must be unaffected
    jobs = [code for pair in zip(list(programs.values()), good * len(programs)) for code in pair]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=sandbox.n_workers) as pool:
        verdicts = list(pool.map(lambda code: sandbox.run(code, suite, expected), jobs))
    elapsed = time.monotonic() - started
    assert _snapshot(sentinel_dir) == before, "a program changed files outside its scratch dir"
    return dict(zip(programs, verdicts[0::2])), verdicts[1::2], elapsed


def _ipc_keys() -> set[str]:
    keys = set()
    for table in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):
        with open(table) as lines:
            keys |= {line.split()[0] for line in list(lines)[1:]}
    return keys


def test_hostile_programs_are_contained_and_never_pass(sandbox, add_suite, sentinel_dir, host_socket, monkeypatch):
    leftovers = [m for m in HOST_MARKERS if os.path.exists(m)]
    assert not leftovers, f"remove stale markers first: {leftovers}"
    ipc_before = _ipc_keys()
    suite, expected = add_suite
    socket_path, accepted = host_socket
    hostile, good, elapsed = _run_hostile(sandbox, suite, expected, list(HOSTILE_EXPECTED), sentinel_dir, monkeypatch, socket_path)
    for name, verdicts in hostile.items():
        for verdict in verdicts:
            assert verdict.status in HOSTILE_EXPECTED[name], (name, verdict)
    assert all(statuses(v) == ["pass", "pass"] for v in good), good
    try:
        assert not [m for m in HOST_MARKERS if os.path.exists(m)], "a marker escaped the sandbox"
    finally:
        for marker in HOST_MARKERS:
            Path(marker).unlink(missing_ok=True)
    assert not _sandbox_processes(sandbox), "processes outlived their sample"
    assert not accepted, "a program connected to a unix socket on the host"
    assert _ipc_keys() == ipc_before, "System V IPC objects outlived their sample"
    assert elapsed < 150


def test_memory_is_limited_for_the_whole_process_tree(sandbox, sentinel_dir):
    """Three children of 400 MiB each stay under the 1 GiB per process, not together."""
    recording = sandbox.record(CANONICAL_ADD, Suite("add", (Phase("base", [[1, 2]], 60.0),)))
    phase = Phase("base", [[1, 2]], cpu_budget=20.0, cpu_limits=(10.0,), digests=tuple(recording.digests[0]))
    verdict, = sandbox.run(_program("memory_children", sentinel_dir), Suite("add", (phase,)), lambda p, i: recording.blobs[p][i])
    assert verdict.status == "fail", verdict
    assert "memory" in verdict.reason or verdict.reason.startswith("expected 3, got None"), verdict


def test_ipc_objects_do_not_connect_samples(sandbox, add_suite, sentinel_dir):
    """The program passes only if it finds what an earlier sample left: run it twice, one after the other. (Its
    plus phase runs in the same sandbox as its base phase, so it may find its own objects there.)"""
    suite, expected = add_suite
    for _ in range(2):
        assert sandbox.run(_program("ipc_objects", sentinel_dir), suite, expected)[0].status == "fail"


def test_sleeping_under_each_input_deadline_hits_the_sample_deadline(sandbox):
    """Each input's wall-clock deadline restarts with its output; the sample's own deadline does not."""
    canonical = CANONICAL_ADD
    inputs = [[k, k] for k in range(10)]
    recording = sandbox.record(canonical, Suite("add", (Phase("base", inputs, 60.0),)))
    phase = Phase("base", inputs, cpu_budget=0.5 * len(inputs), cpu_limits=(0.5,) * len(inputs), digests=tuple(recording.digests[0]))
    started = time.monotonic()
    verdict, = sandbox.run((HOSTILE_DIR / "slow_sleeper.py").read_text(), Suite("add", (phase,)), lambda p, i: recording.blobs[p][i])
    elapsed = time.monotonic() - started
    # 1.3 s per input is under the per-input 2 x 0.5 + 0.5 s, but 10 of them exceed 2 x 5 + 0.5 s.
    assert verdict.status == "timeout" and "sample's wall-clock limit" in verdict.reason, verdict
    assert 10.5 <= elapsed < 13.5


def test_a_spinning_neighbour_does_not_slow_a_sample_beyond_its_share(sandbox, add_suite, sentinel_dir):
    """With a cgroup each sample gets at most one CPU: 60 spinning children share the hostile sample's."""
    if not sandbox.protections.cgroups:
        pytest.skip("no cgroup here: the CPU share is not enforced (Sandbox.protections says so)")
    suite, expected = add_suite
    slow_good = "def add(x, y):\n    s = 0\n    for k in range(300000):\n        s += k\n    return x + y\n"
    with ThreadPoolExecutor(max_workers=2) as pool:
        hostile = pool.submit(sandbox.run, _program("spinning_children", sentinel_dir), suite, expected)
        time.sleep(0.05)
        good = [sandbox.run(slow_good, suite, expected) for _ in range(3)]
        assert statuses(hostile.result()) != ["pass", "pass"]
    assert all(statuses(v) == ["pass", "pass"] for v in good), good


def test_the_child_runner_imports_only_the_standard_library():
    import ast

    from eval.execution import child

    tree = ast.parse(Path(child.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_seccomp_filter_layout():
    """One 8-byte instruction each: load arch, check it, load nr, refuse x32, one check per call, three returns."""
    program = launcher.seccomp_program("x86_64")
    refused = launcher._REFUSED_SYSCALLS["x86_64"]
    assert len(program) == 8 * (4 + len(refused) + 3)
    assert launcher.seccomp_program("riscv128") is None


def test_protections_on_this_machine(sandbox):
    summary = sandbox.protections.summary()
    assert not summary["unsandboxed"] and "bubblewrap" in summary["isolation"]
    assert sandbox.protections.seccomp
    assert not any(bind.startswith(str(Path(__file__).parent.parent) + "/") and "site-packages" not in bind
                   for bind in sandbox.protections.binds), "the project tree must not be visible inside"
    if os.geteuid() == 0:
        assert sandbox.protections.root and "uid of its own" in summary["user"]


def test_without_bwrap_it_stops_with_the_cause_unless_unsandboxed_is_allowed(add_suite, monkeypatch):
    monkeypatch.setattr(launcher, "find_bwrap", lambda: None)
    monkeypatch.setattr(launcher, "_probed", {})
    with pytest.raises(SandboxError, match="bwrap not found.*allow_unsandboxed=true"):
        Sandbox(SandboxConfig(**FAST), n_workers=1)
    box = Sandbox(SandboxConfig(allow_unsandboxed=True, **FAST), n_workers=1)
    summary = box.protections.summary()
    assert summary["unsandboxed"] and "NONE" in summary["isolation"] and summary["degraded"]
    suite, expected = add_suite
    assert statuses(box.run(CANONICAL_ADD, suite, expected)) == ["pass", "pass"]
    assert statuses(box.run("def add(x, y):\n    return x - y\n", suite, expected)) == ["fail", "fail"]
    assert statuses(box.run((HOSTILE_DIR / "infinite_loop.py").read_text(), suite, expected)) == ["timeout", "timeout"]


def test_start_up_failure_names_the_cause(monkeypatch):
    monkeypatch.setattr(launcher, "_binds", lambda sys_path: [])  # the interpreter's prefix not shown inside
    monkeypatch.setattr(launcher, "_probed", {})
    with pytest.raises(SandboxError) as error:
        Sandbox(SandboxConfig(**FAST), n_workers=1)
    if sys.base_prefix.startswith("/usr/"):
        pytest.skip("the interpreter lives under /usr, which is always shown")
    assert "not visible inside the sandbox" in str(error.value) and "allow_unsandboxed" in str(error.value)


def test_verdicts_do_not_depend_on_parallelism(add_suite):
    suite, expected = add_suite
    programs = [CANONICAL_ADD, "def add(x, y):\n    return x - y\n", (HOSTILE_DIR / "segfault.py").read_text(),
                "def add(x, y):\n    while y == 6:\n        pass\n    return x + y\n", (HOSTILE_DIR / "eq_raises.py").read_text()]
    runs = []
    for n_workers in (1, 2):
        box = Sandbox(SandboxConfig(**FAST), n_workers=n_workers)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            runs.append(list(pool.map(lambda code: box.run(code, suite, expected), programs)))
    assert runs[0] == runs[1]
    assert [statuses(v) for v in runs[0]] == [["pass", "pass"], ["fail", "fail"], ["error", "error"], ["pass", "timeout"], ["fail", "fail"]]


UNPRIVILEGED_SCRIPT = """
import json, sys
from eval.execution.sandbox import Phase, Sandbox, SandboxConfig, Suite
box = Sandbox(SandboxConfig(memory_limit_mb=1024, wall_factor=2.0, wall_slack_s=0.5), n_workers=2)
canonical = "def add(x, y):\\n    return x + y\\n"
inputs = {"base": [[1, 2], [3, 4]], "plus": [[5, 6], [10**30, -1], [0, 0]]}
rec = box.record(canonical, Suite("add", tuple(Phase(n, i, 60.0) for n, i in inputs.items())))
suite = Suite("add", tuple(Phase(n, a, 0.5 * (len(a) + 1), (0.5,) * len(a), tuple(rec.digests[p])) for p, (n, a) in enumerate(inputs.items())))
programs = json.loads(sys.argv[1])
verdicts = {name: [v.status for v in box.run(code, suite, lambda p, i: rec.blobs[p][i])] for name, code in programs.items()}
print(json.dumps({"verdicts": verdicts, "protections": box.protections.summary(), "root": box.protections.root}))
"""


def test_unprivileged_mode_as_a_non_root_user(tmp_path, sentinel_dir, add_suite):
    """What a cluster node gives: not root, user namespaces, no cgroup to create. Run as uid 65534 here."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs root (to become another uid) and util-linux setpriv/unshare")
    repo = Path(__file__).parent.parent
    prefix = os.path.realpath(sys.base_prefix)
    # Python here may live in a private directory (/root/.pyenv): a private mount namespace shows it to the
    # unprivileged user as a cluster's shared software directory would be (the rest of the directory stays hidden).
    hidden = next((str(p) for p in [*Path(prefix).parents][::-1] if str(p) != "/" and not os.stat(p).st_mode & 0o001), None)
    names = ["infinite_loop", "fork_bomb", "files", "network", "answer_key", "spinning_children", "memory_children", "outlive", "keyring"]
    programs = {"canonical": CANONICAL_ADD, "wrong": "def add(x, y):\n    return x - y\n",
                **{n: _program(n, sentinel_dir) for n in names}}
    run_as = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--reset-env", "--",
              "env", f"PYTHONPATH={repo}", "HOME=/nonexistent", sys.executable, "-c", UNPRIVILEGED_SCRIPT, json.dumps(programs)]
    if hidden:
        rest = os.path.relpath(prefix, hidden).split("/")[0]
        stage = tmp_path / "stage"
        stage.mkdir()
        script = (f"mount --bind {shlex.quote(os.path.join(hidden, rest))} {shlex.quote(str(stage))} && "
                  f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(hidden)} && mkdir {shlex.quote(os.path.join(hidden, rest))} && "
                  f"mount --move {shlex.quote(str(stage))} {shlex.quote(os.path.join(hidden, rest))} && exec \"$@\"")
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *run_as]
    else:
        command = run_as
    before = _snapshot(sentinel_dir)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["root"] and not report["protections"]["unsandboxed"]
    assert "user namespace" in report["protections"]["user"]
    verdicts = report["verdicts"]
    assert verdicts.pop("canonical") == ["pass", "pass"] and verdicts.pop("wrong") == ["fail", "fail"]
    for name, phase_statuses in verdicts.items():
        assert all(s in HOSTILE_EXPECTED[name] for s in phase_statuses), (name, phase_statuses)
    assert _snapshot(sentinel_dir) == before
    assert not _live_processes({65534}), "processes of the unprivileged run outlived it"
