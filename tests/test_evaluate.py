"""End-to-end evaluation: canonical solutions, wrong ones, pass@1, agreement with EvalPlus, cache, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import pytest

from eval.benchmarks.data import load_tasks
from eval.errors import HarnessError
from eval.execution.evaluate import GroundTruth, evaluate_samples, load_samples, write_eval_results
from eval.execution.sandbox import Sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("humaneval", "mbpp")


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_canonical_solutions_pass_every_base_and_plus_test(benchmark, ground_truth_cache):
    """164/164 HumanEval+ v0.1.10 and 378/378 MBPP+ v0.2.0, base and plus."""
    results = ground_truth_cache[1](benchmark)
    n_tasks = len(load_tasks(benchmark))
    failing = {t: e for t, es in results["tasks"].items() for e in es if (e["base_status"], e["plus_status"]) != ("pass", "pass")}
    assert not failing
    assert results["pass@1"] == {"base": 1.0, "plus": 1.0}
    assert results["n_samples"] == results["n_tasks"] == n_tasks
    assert results["status_counts"]["plus"] == {"pass": n_tasks, "fail": 0, "timeout": 0, "error": 0}
    if benchmark == "humaneval":  # EvalPlus 0.3.1 fails this canonical solution (find_zero oracle bug)
        assert results["tasks"]["HumanEval/32"][0]["plus_status"] == "pass"


@pytest.mark.slow
def test_canonical_solutions_of_mbpp_plus_v010_pass(ground_truth_cache):
    """The release the paper's authors used: 399/399."""
    from tests.conftest import canonical_samples

    cache_dir, _ = ground_truth_cache
    samples = canonical_samples("mbpp", "v0.1.0")
    results = evaluate_samples("mbpp", samples, cache_dir=cache_dir, progress=False, dataset_version="v0.1.0")
    assert results["n_tasks"] == len(samples) == 399
    assert results["status_counts"]["plus"] == {"pass": 399, "fail": 0, "timeout": 0, "error": 0}


def test_only_the_tasks_present_get_expected_outputs_computed(tmp_path):
    tasks = load_tasks("humaneval")
    sample = lambda t: {"task_id": t, "solution": tasks[t]["prompt"] + tasks[t]["canonical_solution"]}  # noqa: E731
    evaluate_samples("humaneval", [sample("HumanEval/0"), sample("HumanEval/53")], cache_dir=tmp_path, progress=False, n_workers=1)
    (path,) = tmp_path.glob("*.gt")
    from eval.execution.groundtruth import cached_task_ids

    cached = lambda: cached_task_ids(path)  # noqa: E731
    assert cached() == {"HumanEval/0", "HumanEval/53"}
    results = evaluate_samples("humaneval", [sample("HumanEval/2"), sample("HumanEval/53")], cache_dir=tmp_path, progress=False, n_workers=1)
    assert results["pass@1"] == {"base": 1.0, "plus": 1.0}
    assert cached() == {"HumanEval/0", "HumanEval/2", "HumanEval/53"}


def test_unsandboxed_evaluation_is_refused_unless_allowed_and_then_recorded(tmp_path, monkeypatch):
    from eval.execution import sandbox as launcher
    from eval.execution.sandbox import SandboxConfig, SandboxError

    monkeypatch.setattr(launcher, "find_bwrap", lambda: None)
    monkeypatch.setattr(launcher, "_probed", {})
    tasks = load_tasks("humaneval")
    samples = [{"task_id": "HumanEval/53", "solution": tasks["HumanEval/53"]["prompt"] + tasks["HumanEval/53"]["canonical_solution"]}]
    with pytest.raises(SandboxError, match="allow_unsandboxed=true"):
        evaluate_samples("humaneval", samples, cache_dir=tmp_path, progress=False, n_workers=1)
    results = evaluate_samples("humaneval", samples, cache_dir=tmp_path, progress=False, n_workers=1,
                               sandbox_config=SandboxConfig(allow_unsandboxed=True))
    assert results["protections"]["unsandboxed"] is True and results["pass@1"]["plus"] == 1.0


def test_wrong_solutions_fail_with_the_first_failing_input(ground_truth_cache):
    cache_dir, canonical = ground_truth_cache
    canonical("humaneval")
    samples = [
        {"task_id": "HumanEval/0", "completion": "    return None\n"},
        {"task_id": "HumanEval/53", "completion": "    return x + y + 1\n"},
        {"task_id": "HumanEval/53", "completion": "    return x + y if x < 10**9 else 0\n"},
        {"task_id": "HumanEval/32", "completion": "    return 0.0\n"},
    ]
    results = evaluate_samples("humaneval", samples, cache_dir=cache_dir, progress=False)
    none_sample = results["tasks"]["HumanEval/0"][0]
    assert (none_sample["base_status"], none_sample["plus_status"]) == ("fail", "fail")
    assert none_sample["details"]["base"] == {"input_index": 0, "input": "[[1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3]", "reason": "expected True, got None"}
    off_by_one, late_bug = results["tasks"]["HumanEval/53"]
    assert off_by_one["details"]["base"] == {"input_index": 0, "input": "[0, 1]", "reason": "expected 1, got 2"}
    # Correct on the base tests, wrong on a plus input: plus@1 counts it as a failure.
    assert (late_bug["base_status"], late_bug["plus_status"]) == ("pass", "fail")
    plus_input = load_tasks("humaneval")["HumanEval/53"]["plus_input"][late_bug["details"]["plus"]["input_index"]]
    assert plus_input[0] >= 10**9 and late_bug["details"]["base"] is None
    assert results["tasks"]["HumanEval/32"][0]["base_status"] == "fail"
    assert results["pass@1"] == {"base": pytest.approx((0 + 1 / 2 + 0) / 3), "plus": 0.0}


def test_find_zero_accepts_any_root_within_atol(ground_truth_cache):
    """HumanEval/32: EvalPlus 0.3.1 records no pass at all (its oracle `continue`s first); the fixed
    oracle accepts any x with |poly(xs, x)| <= atol, not only the canonical solution's root."""
    cache_dir, canonical = ground_truth_cache
    canonical("humaneval")
    # Newton's method to a tighter tolerance: a third of its roots differ from the canonical ones.
    tighter_newton = (
        "    dxs = [xs[i] * i for i in range(1, len(xs))]\n"
        "    x = 0.0\n"
        "    for _ in range(1000):\n"
        "        fx, dfx = poly(xs, x), poly(dxs, x)\n"
        "        if abs(fx) < 1e-7:\n"
        "            break\n"
        "        x = x - fx / dfx\n"
        "    return x\n"
    )
    results = evaluate_samples("humaneval", [{"task_id": "HumanEval/32", "completion": tighter_newton}], cache_dir=cache_dir, progress=False)
    entry = results["tasks"]["HumanEval/32"][0]
    assert (entry["base_status"], entry["plus_status"]) == ("pass", "pass"), entry


def test_subset_of_tasks_several_samples_each_in_input_order(ground_truth_cache):
    cache_dir, canonical = ground_truth_cache
    canonical("mbpp")
    tasks = load_tasks("mbpp")
    right = tasks["Mbpp/3"]["canonical_solution"]
    samples = [
        {"task_id": "Mbpp/3", "solution": "def is_not_prime(n):\n    return False\n"},
        {"task_id": "Mbpp/2", "solution": tasks["Mbpp/2"]["canonical_solution"]},
        {"task_id": "Mbpp/3", "solution": right},
        {"task_id": "Mbpp/3", "solution": "def is_not_prime(n):\n    return True\n"},
    ]
    results = evaluate_samples("mbpp", samples, cache_dir=cache_dir, n_workers=2, progress=False)
    assert list(results["tasks"]) == ["Mbpp/3", "Mbpp/2"]
    assert [e["base_status"] for e in results["tasks"]["Mbpp/3"]] == ["fail", "pass", "fail"]
    assert results["pass@1"]["base"] == pytest.approx((1 / 3 + 1) / 2)
    assert results["n_samples"] == 4 and results["n_tasks"] == 2
    assert results["dataset_sha256"] == "af43697e8791c4c149bdfd6b489d8b5412507551ac20e28a439f650b8225db63"
    assert results["protections"]["degraded"] == [] or os.geteuid() != 0


def _evalplus_statuses(benchmark: str, task: dict, solution: str) -> tuple[str, str]:
    """EvalPlus 0.3.1's own verdicts (evalplus.evaluate.check_correctness) for one sample."""
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.evaluate import check_correctness
    from evalplus.gen.util import trusted_exec

    code = task["prompt"] + task["canonical_solution"]
    not_none = benchmark == "mbpp" and task["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
    expected = {}
    for phase in ("base", "plus"):
        expected[phase], expected[f"{phase}_time"] = trusted_exec(code, deepcopy(task[f"{phase}_input"]), task["entry_point"], record_time=True, output_not_none=not_none)
    result = check_correctness(benchmark, 0, task, solution, expected)
    return result["base"][0], result["plus"][0]


AGREEMENT_SAMPLES = {
    "humaneval": [
        ("HumanEval/0", "    return False\n"),
        ("HumanEval/2", "    return number % 1.0\n"),
        ("HumanEval/2", "    return round(number % 1.0, 2)\n"),
        ("HumanEval/4", "    return 0.0\n"),
        ("HumanEval/13", "    import math\n    return math.gcd(a, b)\n"),
        ("HumanEval/34", "    return set(l)\n"),
        ("HumanEval/34", "    return sorted(list(set(l)))\n"),
        ("HumanEval/53", "    return x + y\n"),
        ("HumanEval/53", "    return float(x + y)\n"),
    ],
    "mbpp": [
        ("Mbpp/2", "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"),
        ("Mbpp/2", "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n"),
        ("Mbpp/82", "import math\ndef volume_sphere(r):\n    return 4 * math.pi * r**3 / 3\n"),
        ("Mbpp/82", "import math\ndef volume_sphere(r):\n    return math.pi * r**3\n"),
        ("Mbpp/88", "import collections\ndef freq_count(xs):\n    return dict(collections.Counter(xs))\n"),
        ("Mbpp/232", "def larg_nnum(xs, n):\n    return sorted(xs)[-n:]\n"),
        ("Mbpp/558", "def digit_distance_nums(a, b):\n    a, b = str(a), str(b)\n    w = max(len(a), len(b))\n    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(w), b.zfill(w)))\n"),
        ("Mbpp/581", "import math\ndef surface_Area(b, h):\n    return round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + h * h))\n"),
        ("Mbpp/737", "import re\ndef check_str(s):\n    return bool(re.search('^[aeiouAEIOU][A-Za-z0-9_]*', s))\n"),
        ("Mbpp/737", "def check_str(s):\n    return None\n"),
    ],
}


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_verdicts_agree_with_evalplus_check_correctness(benchmark, ground_truth_cache):
    """Ordinary samples (right, wrong, equal under ==, within atol, special oracles) get EvalPlus's
    verdicts. HumanEval/32 is left out: EvalPlus 0.3.1 fails every sample there."""
    cache_dir, canonical = ground_truth_cache
    canonical(benchmark)
    tasks = load_tasks(benchmark)
    samples = [{"task_id": t, "solution": (tasks[t]["prompt"] if benchmark == "humaneval" else "") + s} for t, s in AGREEMENT_SAMPLES[benchmark]]
    ours = evaluate_samples(benchmark, samples, cache_dir=cache_dir, progress=False)
    position = {t: 0 for t in ours["tasks"]}
    mismatches, seen = [], set()
    for sample in samples:
        entry = ours["tasks"][sample["task_id"]][position[sample["task_id"]]]
        position[sample["task_id"]] += 1
        theirs = _evalplus_statuses(benchmark, tasks[sample["task_id"]], sample["solution"])
        seen.add(theirs)
        if (entry["base_status"], entry["plus_status"]) != theirs:
            mismatches.append((sample, entry, theirs))
    assert not mismatches
    assert {("pass", "pass"), ("fail", "fail")} <= seen  # the samples exercise both outcomes


def test_unknown_task_and_malformed_samples_are_clear_errors(ground_truth_cache):
    with pytest.raises(HarnessError, match="'HumanEval/999', which is not a humaneval task"):
        evaluate_samples("humaneval", [{"task_id": "HumanEval/999", "solution": ""}], progress=False)
    with pytest.raises(HarnessError, match="neither a 'solution'"):
        evaluate_samples("humaneval", [{"task_id": "HumanEval/1", "code": ""}], progress=False)
    with pytest.raises(HarnessError, match="Unknown benchmark 'apps'"):
        evaluate_samples("apps", [{"task_id": "x", "solution": ""}], progress=False)


def test_load_samples_reads_jsonl_and_reports_bad_lines(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "HumanEval/1", "completion": "x"}\n\n{"task_id": "HumanEval/2", "solution": "y"}\n')
    assert [s["task_id"] for s in load_samples(path)] == ["HumanEval/1", "HumanEval/2"]
    path.write_text('{"task_id": "HumanEval/1"}\nnot json\n')
    with pytest.raises(HarnessError, match="Line 2 of .* is not valid JSON"):
        load_samples(path)
    with pytest.raises(HarnessError, match="not found"):
        load_samples(tmp_path / "missing.jsonl")


def test_corrupt_ground_truth_cache_is_detected_and_recomputed(tmp_path):
    tasks = {t: task for t, task in load_tasks("humaneval").items() if t in ("HumanEval/0", "HumanEval/53")}
    sandbox = Sandbox(n_workers=2)
    fake_sha = "0" * 64  # a cache of its own, not the real benchmark's
    truth = GroundTruth.load_or_compute("humaneval", tasks, sandbox, sha256=fake_sha, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.gt")
    original = path.read_bytes()
    assert truth.blob("HumanEval/53", 1, 0)
    for corrupt in (original[:-10], original[:-1] + bytes([original[-1] ^ 1]), b"garbage"):
        path.write_bytes(corrupt)
        with pytest.warns(RuntimeWarning, match="is corrupt"):
            again = GroundTruth.load_or_compute("humaneval", tasks, sandbox, sha256=fake_sha, cache_dir=tmp_path, progress=False)
        assert again.tasks["HumanEval/53"].digests == truth.tasks["HumanEval/53"].digests
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the rewritten cache loads cleanly
            GroundTruth.load_or_compute("humaneval", tasks, sandbox, sha256=fake_sha, cache_dir=tmp_path, progress=False)


def test_write_eval_results_is_atomic_json(tmp_path):
    path = tmp_path / "eval_results.json"
    write_eval_results(path, {"pass@1": {"base": 0.5, "plus": 0.25}})
    assert json.loads(path.read_text()) == {"pass@1": {"base": 0.5, "plus": 0.25}}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def test_cli_writes_eval_results_next_to_the_samples(ground_truth_cache, tmp_path):
    cache_dir, canonical = ground_truth_cache
    canonical("humaneval")
    samples = tmp_path / "run" / "samples.jsonl"
    samples.parent.mkdir()
    samples.write_text(
        json.dumps({"task_id": "HumanEval/53", "completion": "    return x + y\n"}) + "\n"
        + json.dumps({"task_id": "HumanEval/53", "completion": "    return x - y\n"}) + "\n"
    )
    done = _cli("benchmark=humaneval", "samples=run/samples.jsonl", f"cache_dir={cache_dir}", "progress=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["benchmark"] == "humaneval" and results["pass@1"] == {"base": 0.5, "plus": 0.5}
    assert [e["base_status"] for e in results["tasks"]["HumanEval/53"]] == ["pass", "fail"]
    assert "pass@1  base 0.5000  plus 0.5000" in done.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval_results.json", "run", "samples.jsonl"]  # no Hydra outputs


@pytest.mark.parametrize(
    "args, message",
    [
        (["benchmark=humaneavl", "samples=samples.jsonl"], "Unknown benchmark 'humaneavl'"),
        (["benchmark=humaneval", "samples=missing.jsonl"], "missing.jsonl not found"),
        (["benchmark=mbpp"], "No samples file given"),
        (["benchmark=mbpp", "samples=samples.jsonl"], "which is not a mbpp task"),
    ],
)
def test_cli_user_errors_exit_2_with_one_paragraph_and_write_nothing(args, message, tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"task_id": "HumanEval/53", "completion": "    return 0\n"}) + "\n")
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


def test_evaluator_runs_from_a_checkout_under_tmp(tmp_path, data_dir):
    """A newcomer's clone under /tmp with its own venv: the sandbox has a private /tmp, yet the venv's
    site-packages (here holding a module the sample imports) stays visible inside it."""
    import shutil
    import venv

    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    copy = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "eval", copy / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "spa", copy / "spa", ignore=shutil.ignore_patterns("__pycache__"))
    venv.create(copy / ".venv", with_pip=False)
    (site,) = (copy / ".venv" / "lib").glob("python3*/site-packages")
    import sysconfig

    # The venv reuses this one's packages (a .pth line) and adds a module of its own.
    (site / "harness.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (site / "spa_tmp_marker.py").write_text("VALUE = 7\n")
    solution = "import spa_tmp_marker\ndef add(x: int, y: int):\n    return x + y + spa_tmp_marker.VALUE - 7\n"
    script = (
        "import json; from eval.execution.evaluate import evaluate_samples\n"
        f"r = evaluate_samples('humaneval', [{{'task_id': 'HumanEval/53', 'solution': {solution!r}}}],"
        f" cache_dir={str(tmp_path / 'gt')!r}, progress=False, n_workers=1)\n"
        "print(json.dumps({'plus': r['status_counts']['plus'], 'details': r['tasks']['HumanEval/53'][0]['details']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(copy), "SPA_DATA_DIR": str(data_dir)}
    result = subprocess.run([str(copy / ".venv" / "bin" / "python"), "-c", script], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plus"]["pass"] == 1, report
