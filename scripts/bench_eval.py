"""Executor benchmark: the sandboxed executor vs EvalPlus's own evaluator, same machine, same run.

Times the evaluation of every canonical solution (164 HumanEval+, 378 MBPP+) by
``eval.execution.evaluate.evaluate_samples`` and by ``evalplus.evaluate.evaluate`` with the same parallelism,
each in a fresh process, both with a cold ground-truth cache (expected outputs computed first) and
a warm one (the comparison that matters: the target is a warm ratio of at most 1.5). Warm runs are
repeated and interleaved, and the fastest of each is kept, so that load from other processes
penalises neither side. Writes ``results/bench/eval.json``. Not a test (``make bench``).

    python scripts/bench_eval.py [--benchmarks humaneval mbpp] [--repeats 2] [--n-workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from eval.benchmarks.data import BENCHMARK_NAMES, benchmark_spec, dataset_path, load_tasks  # noqa: E402

TARGET_RATIO = 1.5
MARK = "BENCH_RESULT "

# Each runner is a fresh interpreter; it prints one MARK line with its timing (taken around the
# evaluation call only, dataset loading and ground-truth cache included).
OURS = """
import json, sys, time
sys.path.insert(0, {repo!r})
from eval.execution.evaluate import evaluate_samples, load_samples
started = time.perf_counter()
results = evaluate_samples({benchmark!r}, load_samples({samples!r}), cache_dir={cache!r}, n_workers={n_workers}, progress=False)
seconds = time.perf_counter() - started
print({mark!r} + json.dumps({{"seconds": seconds, "pass@1": results["pass@1"], "protections": results["protections"]}}))
"""
THEIRS = """
import json, os, time
from evalplus.evaluate import evaluate
result_path = {samples!r}.replace(".jsonl", "_eval_results.json")
if os.path.exists(result_path):
    os.remove(result_path)  # otherwise EvalPlus asks on stdin whether to overwrite it
started = time.perf_counter()
evaluate({benchmark!r}, samples={samples!r}, parallel={n_workers}, i_just_wanna_run=True)
seconds = time.perf_counter() - started
tasks = json.load(open(result_path))["eval"].values()
passes = lambda ok: sum(sum(map(ok, entries)) / len(entries) for entries in tasks) / len(tasks)
print({mark!r} + json.dumps({{"seconds": seconds, "pass@1": {{
    "base": passes(lambda e: e["base_status"] == "pass"),
    "plus": passes(lambda e: e["base_status"] == e["plus_status"] == "pass")}}}}))
"""


def run(template: str, env: dict, **fields) -> dict:
    code = template.format(mark=MARK, repo=str(REPO_ROOT), **fields)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"benchmark run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def bench(benchmark: str, workdir: Path, n_workers: int, repeats: int) -> dict:
    samples = workdir / f"{benchmark}.jsonl"
    with open(samples, "w") as f:
        for task_id, task in load_tasks(benchmark).items():
            f.write(json.dumps({"task_id": task_id, "solution": task["prompt"] + task["canonical_solution"]}) + "\n")
    spec = benchmark_spec(benchmark)
    env = dict(os.environ, XDG_CACHE_HOME=str(workdir / "evalplus-cache"), **{spec.override_env: str(dataset_path(benchmark))})
    fields = dict(benchmark=benchmark, samples=str(samples), n_workers=n_workers, cache=str(workdir / "groundtruth"))
    timings: dict[str, list[float]] = {"ours_cold": [], "evalplus_cold": [], "ours_warm": [], "evalplus_warm": []}
    ours = run(OURS, env, **fields)
    timings["ours_cold"].append(ours["seconds"])
    theirs = run(THEIRS, env, **fields)
    timings["evalplus_cold"].append(theirs["seconds"])
    for _ in range(repeats):
        timings["ours_warm"].append(run(OURS, env, **fields)["seconds"])
        timings["evalplus_warm"].append(run(THEIRS, env, **fields)["seconds"])
    best = {name: min(values) for name, values in timings.items()}
    return {
        "samples": len(load_tasks(benchmark)),
        "seconds": {name: round(value, 2) for name, value in best.items()},
        "all_seconds": {name: [round(v, 2) for v in values] for name, values in timings.items()},
        "ratio_warm": round(best["ours_warm"] / best["evalplus_warm"], 3),
        "ratio_cold": round(best["ours_cold"] / best["evalplus_cold"], 3),
        "pass@1": {"ours": ours["pass@1"], "evalplus": theirs["pass@1"]},
        "protections": ours["protections"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARK_NAMES), choices=list(BENCHMARK_NAMES))
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per evaluator (fastest kept)")
    parser.add_argument("--n-workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench" / "eval.json")
    args = parser.parse_args()
    import evalplus

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: timings will be noisy", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory(prefix="spa-bench-eval-") as workdir:
        for benchmark in args.benchmarks:
            print(f"{benchmark}: timing both evaluators ...", file=sys.stderr)
            results[benchmark] = bench(benchmark, Path(workdir), args.n_workers, args.repeats)
    report = {
        "what": "evaluation of every canonical solution; seconds = fastest run, taken around the evaluate call in a fresh process",
        "target": f"ours_warm <= {TARGET_RATIO} x evalplus_warm",
        "meets_target": all(r["ratio_warm"] <= TARGET_RATIO for r in results.values()),
        "n_workers": args.n_workers,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "evalplus_version": evalplus.__version__,
            "euid": os.geteuid(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "benchmarks": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out)
    header = f"{'benchmark':<10} {'samples':>7} {'ours cold':>10} {'EvalPlus cold':>14} {'ours warm':>10} {'EvalPlus warm':>14} {'warm ratio':>10}"
    print(header)
    for benchmark, r in results.items():
        s = r["seconds"]
        print(f"{benchmark:<10} {r['samples']:>7} {s['ours_cold']:>9.1f}s {s['evalplus_cold']:>13.1f}s {s['ours_warm']:>9.1f}s {s['evalplus_warm']:>13.1f}s {r['ratio_warm']:>10.2f}")
    print("pass@1 (ours vs EvalPlus): " + "; ".join(f"{b}: {r['pass@1']['ours']} vs {r['pass@1']['evalplus']}" for b, r in results.items()))
    print(f"target ratio <= {TARGET_RATIO}: {'met' if report['meets_target'] else 'MISSED'}; wrote {args.out}")


if __name__ == "__main__":
    main()
