"""The sandboxed executor on synthetic suites: verdicts, limits, hostile programs, degraded modes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from eval.sandbox import PhaseVerdict, Phase, Recording, Sandbox, SandboxConfig, Suite

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


def _sandbox_processes(sandbox: Sandbox) -> list[int]:
    """Pids of processes running as one of the sandbox's uids."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid in sandbox.uids:
            found.append(int(entry))
    return found


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
    "fork_bomb": {"timeout"},
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
}


def _run_hostile(sandbox, suite, expected, names, sentinel_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_the_program_must_not_see")
    before = _snapshot(sentinel_dir)
    programs = {name: (HOSTILE_DIR / f"{name}.py").read_text().replace("@SENTINEL_DIR@", str(sentinel_dir)) for name in names}
    good = [CANONICAL_ADD] * 4  # interleaved: other samples must be unaffected
    jobs = [code for pair in zip(list(programs.values()), good * len(programs)) for code in pair]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=sandbox.n_workers) as pool:
        verdicts = list(pool.map(lambda code: sandbox.run(code, suite, expected), jobs))
    elapsed = time.monotonic() - started
    assert _snapshot(sentinel_dir) == before, "a program changed files outside its scratch dir"
    return dict(zip(programs, verdicts[0::2])), verdicts[1::2], elapsed


def test_hostile_programs_are_contained_and_never_pass(sandbox, add_suite, sentinel_dir, monkeypatch):
    if sandbox.protections.namespaces is None:
        pytest.skip("no namespaces here: see test_degraded_sandbox_still_contains")
    leftovers = [m for m in HOST_MARKERS if os.path.exists(m)]
    assert not leftovers, f"remove stale markers first: {leftovers}"
    suite, expected = add_suite
    hostile, good, elapsed = _run_hostile(sandbox, suite, expected, list(HOSTILE_EXPECTED), sentinel_dir, monkeypatch)
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
    assert elapsed < 120


@pytest.mark.parametrize("sentinel_dir", [False], indirect=True)
def test_degraded_sandbox_still_contains(add_suite, sentinel_dir, monkeypatch):
    """Without namespaces: sockets refused in-process, uid drop, process limit, cleanup by uid."""
    if os.geteuid() != 0:
        pytest.skip("the degraded mode under test drops privileges, which needs root")
    box = Sandbox(SandboxConfig(namespaces=False, **FAST), n_workers=2)
    assert box.protections.namespaces is None and box.protections.uid_drop
    assert "executor.sandbox.namespaces=false" in box.protections.summary()["degraded"]
    suite = Suite(add_suite[0].entry_point, add_suite[0].phases)
    names = ["segfault", "os_exit", "signals", "fork_bomb", "memory_bomb", "infinite_loop", "stdout_flood",
             "files", "network", "env_secrets", "outlive", "forge_results", "eq_always_true", "int_subclass"]
    try:
        hostile, good, _ = _run_hostile(box, suite, add_suite[1], names, sentinel_dir, monkeypatch)
    finally:
        for marker in HOST_MARKERS:  # world-writable places are not protected in this mode
            Path(marker).unlink(missing_ok=True)
    for name, verdicts in hostile.items():
        assert all(v.status in HOSTILE_EXPECTED[name] for v in verdicts), (name, verdicts)
    assert all(statuses(v) == ["pass", "pass"] for v in good)
    # Stragglers are killed by uid (kill -9 -1 as that uid); give the kernel a moment to reap them.
    deadline = time.monotonic() + 5
    while _sandbox_processes(box) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _sandbox_processes(box)


def test_weakest_mode_is_reported_and_still_judges(add_suite):
    """No namespaces and no uid drop (what a non-root user without `unshare` gets)."""
    box = Sandbox(SandboxConfig(namespaces=False, drop_privileges=False, **FAST), n_workers=1)
    summary = box.protections.summary()
    assert box.protections.namespaces is None and not box.protections.uid_drop
    assert "bypassable" in summary["network"] and summary["degraded"]
    suite, expected = add_suite
    assert statuses(box.run(CANONICAL_ADD, suite, expected)) == ["pass", "pass"]
    for name in ("signals", "infinite_loop", "eq_always_true"):
        verdicts = box.run((HOSTILE_DIR / f"{name}.py").read_text(), suite, expected)
        assert all(v.status in HOSTILE_EXPECTED[name] for v in verdicts), (name, verdicts)


def test_full_protections_on_a_root_machine_with_unshare(sandbox):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare")
    summary = sandbox.protections.summary()
    assert sandbox.protections.namespaces == "root" and sandbox.protections.uid_drop
    assert summary["degraded"] == []
    assert "network namespace" in summary["network"]


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
