"""GPU numbers of the decoding path, in one process: writes ``results/bench/decoding_gpu.json``.

On a random-weight Llama of DeepSeek-Coder-1.3B's shape (``bench_decoding.py``'s ``gpu-1.3b`` preset), in bf16
with SDPA attention, no EOS (every sequence runs its full budget), it measures

a. ``spa_vs_plain``: SPA (``spa.decode``) against plain greedy (transformers ``generate``, dynamic cache) at
   batch 1 and 32 (150-token prompts, 128 new tokens; ``bench_decoding``'s prompts and runners, interleaved
   repeats, medians): tokens/s, the cost ratio SPA/plain against the targets 1.15 (batch 1) and 1.3 (batch 32),
   and ``torch.cuda.max_memory_allocated`` per method (reset before every run);
b. ``static_cache``: plain ``generate`` with transformers' static cache (``cache_implementation="static"``,
   ``disable_compile=True``) against the dynamic cache; and ``static_cache_compile``: the static cache with
   transformers' own automatic ``torch.compile`` of the decoding forward (on CUDA ``generate`` compiles it by
   itself when the cache is static: ``CompileConfig()``'s defaults, inductor, mode ``reduce-overhead``), its
   warm-up (first and second call: compilation, CUDA-graph recording) apart from its steady state. This part runs
   last: its compile time is the least predictable;
c. ``humaneval_full``: the wall time of a full 164-task HumanEval SPA greedy generation at 512 new tokens, omega
   1.3, 32 tasks per ``spa.decode`` call with ``batch_size=32`` as ``eval/runner.py`` calls it, on the real model
   inputs (``protocol=evalplus``, ``anchor=nl``, ``model=deepseek-coder-1.3b-instruct``: ids and token-masked views
   built by ``eval.benchmarks.protocols``). No EOS and no stop strings, so every sequence runs all 512 tokens:
   the worst case (a real run stops at EOS or a stop string). Target: under 60 s on an H100/H200;
d. ``8bit``: the SPA batch-32 measurement of (a) with the weights quantized to 8 bits by bitsandbytes
   (``spa.load_model(..., quantization="8bit")`` on the model saved to a temporary folder), interleaved with the
   same measurement in bf16: its cost against bf16. Skipped, with the reason, where bitsandbytes does not import
   or there is no CUDA.

Every part runs under a time limit (``--budget-s`` in all, each part capped); a part that fails or runs out of
time records its error (and what it measured so far) and the next part runs. The JSON is rewritten after each part.

ON THE DEVICE (an H200, no internet; evalplus, hydra and omegaconf are not there). 1. Here, stage the data into an
ignored folder of the repo (``results/cache/`` is in .gitignore):

    .venv/bin/python scripts/bench_gpu.py --stage results/cache/device

which copies ``../shared/data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz`` to ``results/cache/device/evalplus/`` and
``../shared/data/tokenizers/deepseek-coder-instruct/`` to ``results/cache/device/tokenizers/`` (the same as
``mkdir -p results/cache/device/evalplus results/cache/device/tokenizers && cp ../shared/data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz
results/cache/device/evalplus/ && cp -r ../shared/data/tokenizers/deepseek-coder-instruct results/cache/device/tokenizers/``),
writes ``results/cache/device/humaneval-inputs.json``: every task's ids and masked ids, built by the harness's
protocol code from those copies (the device cannot import it: no evalplus there; the file records the data
file's sha256, checked there), and copies this venv's bitsandbytes, with only its CUDA 13 libraries (the device's
torch is cu130; the whole 0.50 wheel holds ~125 MB of libraries, over the 64 MiB a call can carry), to
``results/cache/device/site/`` (``--no-stage-bitsandbytes``: leave it out, part d is then skipped). About 12 MB.
2. Call the device tool ``run`` with ``carry=["results/cache/device"]``, ``timeout_s=540`` and the command

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/results/cache/device/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false; set -o pipefail; python3 scripts/bench_gpu.py --data-dir results/cache/device --out $OUT/decoding_gpu.json 2>&1 | tee $OUT/bench_gpu.log

(about 7 minutes: the parts stop by ``--budget-s 400``), then copy ``<files_at>/decoding_gpu.json`` to
``results/bench/decoding_gpu.json``. To carry the official bitsandbytes wheel instead, see the device README's note
on ``.whl`` (``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl bitsandbytes==0.50.2``,
``carry`` ``.whl`` too, ``pip install --target /tmp/site .whl/*.whl`` and ``PYTHONPATH=/tmp/site``) if it fits.

HERE (no GPU): ``--smoke`` runs the same code on the CPU at a toy shape (hidden 64, 2 layers), 3 HumanEval tasks,
8 new tokens, batch 1 and 2, and writes ``results/cache/bench/decoding_gpu-smoke.json``; its numbers mean nothing:

    .venv/bin/python scripts/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_decoding as bd  # noqa: E402
import spa  # noqa: E402
from eval.benchmarks.data import data_dir as shared_data_dir, file_sha256  # noqa: E402  (standard library only: safe on the device)

MODEL_CONFIG = REPO_ROOT / "configs" / "model" / "deepseek-coder-1.3b-instruct.yaml"
PROTOCOL_CONFIG = REPO_ROOT / "configs" / "protocol" / "evalplus.yaml"
TOKENIZER_NAME = "deepseek-coder-instruct"
INPUTS_FILE = "humaneval-inputs.json"
BENCHMARK, CONDITION = "humaneval", "nl"
HUMANEVAL_TARGET_S = 60.0  # on an H100/H200, 164 tasks at 512 new tokens
COST_TARGETS = (1.15, 1.3)  # SPA/plain time at the smallest and the largest batch (1 and 32)
MIB = 2**20

SETTINGS = {
    "device": dict(shape=bd.PRESETS["gpu-1.3b"]["config"], batch_sizes=[1, 32], prompt_tokens=bd.PRESETS["gpu-1.3b"]["prompt_tokens"],
                   new_tokens=bd.PRESETS["gpu-1.3b"]["new_tokens"], repeats=3, humaneval_tasks=None, humaneval_new_tokens=512,
                   humaneval_batch=32, budget_s=400.0, threads=None),
    "smoke": dict(shape=bd.PRESETS["smoke"]["config"], batch_sizes=[1, 2], prompt_tokens=bd.PRESETS["smoke"]["prompt_tokens"],
                  new_tokens=8, repeats=1, humaneval_tasks=3, humaneval_new_tokens=8, humaneval_batch=2, budget_s=150.0, threads=2),
}
# Seconds each part may take at most (the remaining budget caps it further), in the order they run.
PART_CAPS = {"spa_vs_plain": 110.0, "humaneval_full": 170.0, "static_cache": 80.0, "8bit": 90.0, "static_cache_compile": 240.0}
MIN_PART_S = 5.0


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------- time limits
class PartTimeout(BaseException):
    """Raised by SIGALRM when a part outlives its limit (a BaseException: library code's ``except Exception`` lets it by)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------- measuring
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def timed(run, device: torch.device):
    """(outputs, seconds, peak bytes allocated during the call) of ``run()``."""
    reset_peak(device)
    bd.synchronize(device)
    start = time.perf_counter()
    outputs = run()
    bd.synchronize(device)
    return outputs, time.perf_counter() - start, peak_bytes(device)


def measure(runs: dict, repeats: int, device: torch.device, grad_mode=torch.inference_mode) -> tuple[dict, dict]:
    """One warm-up call of each run (its outputs are returned), then ``repeats`` interleaved rounds, so that drifts in
    the machine's state hit every run alike; per run its seconds, warm-up seconds and peak memory."""
    stats = {name: {"seconds": [], "warmup_seconds": None, "peak": None} for name in runs}
    outputs = {}
    with grad_mode():
        for name, run in runs.items():
            outputs[name], stats[name]["warmup_seconds"], stats[name]["peak"] = timed(run, device)
        for _ in range(repeats):
            for name, run in runs.items():
                _, seconds, peak = timed(run, device)
                stats[name]["seconds"].append(seconds)
                if peak is not None:
                    stats[name]["peak"] = max(stats[name]["peak"] or 0, peak)
    return stats, outputs


def row(name: str, batch: int, new_tokens: int, stat: dict, weights: int | None) -> dict:
    seconds = statistics.median(stat["seconds"])
    return {
        "batch_size": batch,
        "method": name,
        "median_seconds": seconds,
        "tokens_per_second": batch * new_tokens / seconds,
        "all_seconds": stat["seconds"],
        "warmup_seconds": stat["warmup_seconds"],
        "peak_allocated_mib": mib(stat["peak"]),
        "peak_over_weights_mib": mib(None if stat["peak"] is None or weights is None else stat["peak"] - weights),
    }


def rows_equal(a: list, b: list) -> int:
    return sum(x == y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- runners
def run_plain_static(model, prompts, masks, new_tokens, compiled: bool = False):
    """Plain greedy with transformers' static cache: eager (``disable_compile``), or with ``generate``'s own
    automatic torch.compile of the decoding forward (CompileConfig's defaults; forced on a CPU for the smoke)."""
    from transformers import CompileConfig

    ids, attention = bd.left_padded(prompts, model.device)
    options: dict = {"cache_implementation": "static"}
    if not compiled:
        options["disable_compile"] = True
    elif model.device.type != "cuda":
        config = CompileConfig()
        config._compile_all_devices = True  # transformers' own switch to compile off-GPU (its tests use it)
        options["compile_config"] = config
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=bd.MASK_ID, **options)
    return out[:, ids.shape[1]:].tolist()


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """The random-weight Llama, built on ``device`` in ``dtype`` with SDPA attention, EOS cleared."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bd.VOCAB, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # no EOS: every sequence runs its full budget
    return model.eval()


# --------------------------------------------------------------------------------------------- HumanEval inputs
def harness_inputs(data_dir: Path, tokenizer_dir: Path) -> dict:
    """Every HumanEval task's model inputs as the harness builds them (eval/runner.py's prepare_inputs without Hydra:
    the evalplus protocol and DeepSeek-Coder-1.3B-Instruct's model config read from configs/, SPA's masking)."""
    import yaml

    from eval.benchmarks.data import benchmark_spec, dataset_sha256
    from eval.benchmarks.protocols import ProtocolSettings, make_protocol

    settings = ProtocolSettings.from_config(yaml.safe_load(PROTOCOL_CONFIG.read_text()))
    model_cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    tokenizer = spa.load_tokenizer(str(tokenizer_dir))
    protocol = make_protocol(settings, model_cfg, tokenizer, masking=None, max_new_tokens=512, data_dir=data_dir,
                             authors_data_dir=None)
    protocol.validate_condition(BENCHMARK, CONDITION)
    version = protocol.dataset_version(BENCHMARK)
    tasks = protocol.tasks(BENCHMARK)
    items = [protocol.model_inputs(tasks[t], BENCHMARK, CONDITION) for t in tasks]
    return {
        "made_by": "scripts/bench_gpu.py (eval.benchmarks.protocols on the files below)",
        "model_config": MODEL_CONFIG.relative_to(REPO_ROOT).as_posix(),
        "protocol": settings.name,
        "anchor": CONDITION,
        "masking": protocol.masking,
        "mask_token": model_cfg.get("mask_token"),
        "dataset": {"benchmark": BENCHMARK, "version": version, "file": benchmark_spec(BENCHMARK, version).file_name,
                    "sha256": dataset_sha256(BENCHMARK, data_dir, version)},
        "tokenizer_json_sha256": file_sha256(tokenizer_dir / "tokenizer.json") if (tokenizer_dir / "tokenizer.json").exists() else None,
        "tasks": [{"task_id": i.task_id, "input_ids": i.input_ids, "masked_input_ids": i.masked_input_ids,
                   "anchor_mask": [int(b) for b in i.anchor_mask], "max_new_tokens": i.max_new_tokens} for i in items],
    }


def staged_inputs(data_dir: Path) -> dict:
    """--stage's inputs file, its data file's sha256 checked (eval.benchmarks.data imports evalplus only to load tasks)."""

    path = data_dir / INPUTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: make it here with `scripts/bench_gpu.py --stage {data_dir}`")
    inputs = json.loads(path.read_text())
    data_file = data_dir / "evalplus" / inputs["dataset"]["file"]
    if data_file.exists() and file_sha256(data_file) != inputs["dataset"]["sha256"]:
        raise ValueError(f"{data_file} is not the file {path} was built from (sha256 differs): stage again")
    inputs["dataset"]["file_checked"] = data_file.exists()
    return inputs


def humaneval_inputs(mode: str, data_dir: Path, tokenizer_dir: Path) -> tuple[dict, dict]:
    """(inputs, where they came from): ``harness`` builds them here, ``staged`` reads ``--stage``'s file, ``auto`` =
    the harness where it imports (not on the device: no evalplus there), else the staged file. Whichever is used,
    the other is compared with it where it is available."""
    source: dict = {}
    harness, harness_error = None, None
    if mode in ("auto", "harness") or (mode == "staged" and (data_dir / INPUTS_FILE).exists()):
        try:
            harness = harness_inputs(data_dir, tokenizer_dir)
        except ImportError as error:  # evalplus (or PyYAML) missing: the device
            harness_error = f"{type(error).__name__}: {error}"
            if mode == "harness":
                raise
    if mode == "harness" or (mode == "auto" and harness is not None):
        inputs, source["inputs_source"] = harness, "harness"
        if (data_dir / INPUTS_FILE).exists():
            source["matches_staged"] = staged_inputs(data_dir)["tasks"] == harness["tasks"]
    else:
        inputs, source["inputs_source"] = staged_inputs(data_dir), f"staged ({data_dir / INPUTS_FILE})"
        if harness is not None:
            source["matches_harness"] = harness["tasks"] == inputs["tasks"]
        else:
            source["harness_unavailable"] = harness_error or "not tried"
    return inputs, source


def stage(dest: Path, data_dir: Path, tokenizer_dir: Path, with_bitsandbytes: bool) -> None:
    """Copy what the device needs into ``dest`` (inside the repo, ignored): the HumanEval+ release, the tokenizer,
    the harness's model inputs built from those copies, and a CUDA-13-only copy of bitsandbytes."""
    import yaml

    from eval.benchmarks.data import benchmark_spec

    version = yaml.safe_load(PROTOCOL_CONFIG.read_text())["datasets"][BENCHMARK]
    name = benchmark_spec(BENCHMARK, version).file_name
    (dest / "evalplus").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / "evalplus" / name, dest / "evalplus" / name)  # copyfile: the sources are read-only
    tokenizer_dest = dest / "tokenizers" / TOKENIZER_NAME
    tokenizer_dest.mkdir(parents=True, exist_ok=True)
    for file in sorted(tokenizer_dir.iterdir()):
        if file.is_file():
            shutil.copyfile(file, tokenizer_dest / file.name)
    inputs = harness_inputs(dest, tokenizer_dest)
    tmp = dest / f".{INPUTS_FILE}.tmp"
    tmp.write_text(json.dumps(inputs))
    os.replace(tmp, dest / INPUTS_FILE)
    log(f"staged {name}, tokenizers/{TOKENIZER_NAME}/ and {INPUTS_FILE} ({len(inputs['tasks'])} tasks) in {dest}")
    if with_bitsandbytes:
        import importlib.metadata
        import importlib.util

        spec = importlib.util.find_spec("bitsandbytes")
        if spec is None or not spec.submodule_search_locations:
            log("bitsandbytes is not installed here: not staged (part d will be skipped on the device)")
        else:
            package = Path(list(spec.submodule_search_locations)[0])
            site = dest / "site"
            shutil.rmtree(site, ignore_errors=True)
            keep = lambda f: not f.name.startswith("libbitsandbytes_") or f.name.startswith(("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))  # noqa: E731
            for file in package.rglob("*"):
                if file.is_file() and "__pycache__" not in file.parts and keep(file):
                    target = site / "bitsandbytes" / file.relative_to(package)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target)
            distribution = importlib.metadata.distribution("bitsandbytes")
            info = Path(distribution._path)  # its .dist-info: transformers reads the version from it
            shutil.copytree(info, site / info.name, copy_function=shutil.copyfile, dirs_exist_ok=True)
            log(f"staged bitsandbytes {distribution.version} (CUDA 13 libraries only) in {site}")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"{dest}: {total / MIB:.1f} MiB to carry")


# --------------------------------------------------------------------------------------------- the parts
class Bench:
    def __init__(self, args, settings: dict, device: torch.device, dtype: torch.dtype, report: dict, out: Path, model, started: float):
        self.args, self.s, self.device, self.dtype, self.report, self.out = args, settings, device, dtype, report, out
        self.model = model
        self.started = started  # the budget counts from before the model was built
        self.deadline = started + args.budget_s
        self.weights = None  # bytes the weights take on the GPU
        self.shared: dict = {}  # outputs and medians one part hands to another (not written)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.report["total_seconds"] = self.elapsed()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.report, indent=2))
        os.replace(tmp, self.out)

    def part(self, name: str, function) -> None:
        remaining = self.deadline - time.perf_counter()
        entry: dict = {}
        if remaining < MIN_PART_S:
            entry["skipped"] = f"the time budget (--budget-s {self.args.budget_s:.0f}) was spent before this part ({remaining:.0f} s left)"
            log(f"== {name}: skipped, {entry['skipped']}")
        else:
            limit = min(PART_CAPS[name], remaining)
            log(f"== {name} (limit {limit:.0f} s; {self.elapsed():.0f} s since start)")
            start = time.perf_counter()
            try:
                with time_limit(limit):
                    function(entry)
            except (Exception, PartTimeout) as error:
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc(limit=-6)[-3000:]
                log(f"   {name} FAILED: {entry['error']}")
            entry["elapsed_s"] = time.perf_counter() - start
            log(f"== {name}: {'error' if 'error' in entry else 'skipped' if 'skipped' in entry else 'ok'} in {entry['elapsed_s']:.1f} s")
        self.report["parts"][name] = entry
        self.cleanup()
        self.write()

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # a.
    def spa_vs_plain(self, entry: dict) -> None:
        s = self.s
        entry.update(prompt_tokens=s["prompt_tokens"], new_tokens=s["new_tokens"], repeats=self.args.repeats, omega=bd.OMEGA,
                     weights_allocated_mib=mib(self.weights), results=[], ratios={})
        for index, batch in enumerate(s["batch_sizes"]):
            prompts, masks = bd.make_prompts(batch, s["prompt_tokens"], seed=batch)
            runs = {"plain_greedy": lambda: bd.run_plain(self.model, prompts, masks, s["new_tokens"]),
                    "spa_engine": lambda: bd.run_engine(self.model, prompts, masks, s["new_tokens"])}
            stats, _ = measure(runs, self.args.repeats, self.device)
            rows = {name: row(name, batch, s["new_tokens"], stats[name], self.weights) for name in runs}
            entry["results"] += rows.values()
            cost = rows["spa_engine"]["median_seconds"] / rows["plain_greedy"]["median_seconds"]
            target = COST_TARGETS[0] if index == 0 else COST_TARGETS[1]
            entry["ratios"][f"batch_{batch}"] = {"spa_cost_vs_plain": cost, "spa_throughput_vs_plain": 1 / cost,
                                                 "target_cost": target, "meets_target": cost <= target}
            self.shared[("spa_bf16", batch)] = rows["spa_engine"]
            log(f"   batch {batch:>3}: plain {rows['plain_greedy']['tokens_per_second']:9.1f} tok/s, SPA "
                f"{rows['spa_engine']['tokens_per_second']:9.1f} tok/s, SPA/plain {cost:.3f} (target {target}); peak "
                f"{rows['plain_greedy']['peak_allocated_mib']} / {rows['spa_engine']['peak_allocated_mib']} MiB")

    # b.
    def static_cache(self, entry: dict) -> None:
        s = self.s
        entry.update(prompt_tokens=s["prompt_tokens"], new_tokens=s["new_tokens"], repeats=self.args.repeats, results=[], ratios={},
                     static="generate(cache_implementation='static', disable_compile=True)")
        for batch in s["batch_sizes"]:
            prompts, masks = bd.make_prompts(batch, s["prompt_tokens"], seed=batch)
            runs = {"plain_dynamic_cache": lambda: bd.run_plain(self.model, prompts, masks, s["new_tokens"]),
                    "plain_static_cache": lambda: run_plain_static(self.model, prompts, masks, s["new_tokens"])}
            stats, outputs = measure(runs, self.args.repeats, self.device)
            rows = {name: row(name, batch, s["new_tokens"], stats[name], self.weights) for name in runs}
            rows["plain_static_cache"]["rows_equal_to_dynamic"] = rows_equal(outputs["plain_static_cache"], outputs["plain_dynamic_cache"])
            entry["results"] += rows.values()
            speedup = rows["plain_dynamic_cache"]["median_seconds"] / rows["plain_static_cache"]["median_seconds"]
            entry["ratios"][f"batch_{batch}"] = {"static_speedup_vs_dynamic": speedup, "pays": speedup > 1.0}
            self.shared[("dynamic", batch)] = (rows["plain_dynamic_cache"], outputs["plain_dynamic_cache"])
            log(f"   batch {batch:>3}: dynamic {rows['plain_dynamic_cache']['tokens_per_second']:9.1f} tok/s, static "
                f"{rows['plain_static_cache']['tokens_per_second']:9.1f} tok/s, static speed-up {speedup:.3f}")

    def static_cache_compile(self, entry: dict) -> None:
        s = self.s
        if not self.args.compile:
            entry["skipped"] = "--no-compile"
            return
        from transformers import CompileConfig

        entry.update(prompt_tokens=s["prompt_tokens"], new_tokens=s["new_tokens"], repeats=self.args.repeats, results=[], ratios={},
                     compile="generate(cache_implementation='static'): transformers compiles the decoding forward itself",
                     compile_config=CompileConfig().to_dict())
        for batch in s["batch_sizes"]:
            prompts, masks = bd.make_prompts(batch, s["prompt_tokens"], seed=batch)
            run = lambda: run_plain_static(self.model, prompts, masks, s["new_tokens"], compiled=True)  # noqa: E731
            warmups = []
            with torch.no_grad():
                for _ in range(2):  # compilation, then (reduce-overhead) CUDA-graph recording
                    outputs, seconds, _ = timed(run, self.device)
                    warmups.append(seconds)
                    log(f"   batch {batch:>3}: warm-up call {len(warmups)}: {seconds:.1f} s")
                stats, _ = measure({"plain_static_compiled": run}, self.args.repeats - 1, self.device, grad_mode=torch.no_grad)
            stat = stats["plain_static_compiled"]
            stat["seconds"] = [stat["warmup_seconds"], *stat["seconds"]]  # the third call is already steady
            stat["warmup_seconds"] = None
            result = row("plain_static_compiled", batch, s["new_tokens"], stat, self.weights)
            result["compile_warmup_seconds"] = {"first_call": warmups[0], "second_call": warmups[1]}
            dynamic = self.shared.get(("dynamic", batch))
            ratios = {}
            if dynamic is not None:
                result["rows_equal_to_dynamic"] = rows_equal(outputs, dynamic[1])
                speedup = dynamic[0]["median_seconds"] / result["median_seconds"]
                ratios = {"compiled_speedup_vs_dynamic": speedup, "pays": speedup > 1.0,
                          # warm-up time beyond two dynamic-cache calls, over the time each later call saves
                          "calls_to_repay_warmup": (warmups[0] + warmups[1] - 2 * dynamic[0]["median_seconds"])
                          / (dynamic[0]["median_seconds"] - result["median_seconds"]) if speedup > 1.0 else None}
            entry["results"].append(result)
            entry["ratios"][f"batch_{batch}"] = ratios
            log(f"   batch {batch:>3}: compiled {result['tokens_per_second']:9.1f} tok/s steady"
                + (f", speed-up vs dynamic {ratios['compiled_speedup_vs_dynamic']:.3f}" if ratios else ""))

    # c.
    def humaneval_full(self, entry: dict) -> None:
        s = self.s
        inputs, source = humaneval_inputs(self.args.inputs, self.args.data_dir, self.args.tokenizer)
        tasks = inputs["tasks"][: s["humaneval_tasks"]] if s["humaneval_tasks"] else inputs["tasks"]
        new_tokens, per_call = s["humaneval_new_tokens"], s["humaneval_batch"]
        lengths = [len(t["input_ids"]) for t in tasks]
        entry.update(source, dataset=inputs["dataset"], protocol=inputs["protocol"], anchor=inputs["anchor"], masking=inputs["masking"],
                     model_config=inputs["model_config"], n_tasks=len(tasks), new_tokens=new_tokens, omega=bd.OMEGA, batch_size=per_call,
                     eos="none", stop_strings="none",
                     worst_case="no EOS and no stop strings: every sequence runs all its new tokens (a real run stops earlier)",
                     prompt_tokens={"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths), "total": sum(lengths)},
                     anchored_tokens=sum(sum(t["anchor_mask"]) for t in tasks), chunk_seconds=[], completed_tasks=0, generated_tokens=0)
        if self.device.type == "cuda" and new_tokens == 512:
            entry["target_seconds"] = HUMANEVAL_TARGET_S
        reset_peak(self.device)
        start = time.perf_counter()
        full = True
        with torch.inference_mode():
            for first in range(0, len(tasks), per_call):  # as eval/runner.py: batch_size tasks per spa.decode call
                chunk = tasks[first : first + per_call]
                bd.synchronize(self.device)
                began = time.perf_counter()
                outputs = spa.decode(self.model, [t["input_ids"] for t in chunk], omega=bd.OMEGA,
                                     masked_prompts=[t["masked_input_ids"] for t in chunk], max_new_tokens=new_tokens,
                                     eos_token_id=None, batch_size=per_call)
                bd.synchronize(self.device)
                entry["chunk_seconds"].append(time.perf_counter() - began)
                entry["completed_tasks"] += len(chunk)
                entry["generated_tokens"] += sum(map(len, outputs))
                full &= all(len(o) == new_tokens for o in outputs)
                entry["seconds_so_far"] = time.perf_counter() - start
                entry["extrapolated_seconds"] = entry["seconds_so_far"] / entry["completed_tasks"] * len(tasks)
                log(f"   tasks {first + 1}-{first + len(chunk)}: {entry['chunk_seconds'][-1]:.1f} s")
        seconds = time.perf_counter() - start
        entry.update(seconds=seconds, tokens_per_second=entry["generated_tokens"] / seconds, all_full_length=full,
                     peak_allocated_mib=mib(peak_bytes(self.device)))
        for key in ("seconds_so_far", "extrapolated_seconds"):
            entry.pop(key)
        if "target_seconds" in entry:
            entry["meets_target"] = seconds < HUMANEVAL_TARGET_S
        log(f"   {len(tasks)} tasks x {new_tokens} new tokens: {seconds:.1f} s, {entry['tokens_per_second']:.0f} new tokens/s "
            f"(inputs: {entry['inputs_source']})")

    # d.
    def eight_bit(self, entry: dict) -> None:
        s = self.s
        try:
            import bitsandbytes
        except Exception as error:  # ImportError, or its own errors at import on an unsupported machine
            entry["skipped"] = (f"bitsandbytes does not import ({type(error).__name__}: {error}); stage it with "
                                "`scripts/bench_gpu.py --stage results/cache/device` and set PYTHONPATH (see the docstring)")
            return
        if self.device.type != "cuda":
            entry["skipped"] = f"no CUDA: the 8-bit path is bitsandbytes on CUDA (bitsandbytes {bitsandbytes.__version__} imports here)"
            return
        batch = s["batch_sizes"][-1]
        entry.update(bitsandbytes=bitsandbytes.__version__, bitsandbytes_file=str(Path(bitsandbytes.__file__).parent), batch_size=batch,
                     prompt_tokens=s["prompt_tokens"], new_tokens=s["new_tokens"], repeats=self.args.repeats,
                     loading="model saved to a temporary folder, spa.load_model(dtype='bf16', quantization='8bit')")
        folder = Path(tempfile.mkdtemp(prefix="bench_gpu_8bit_"))
        quantized = None
        try:
            began = time.perf_counter()
            self.model.save_pretrained(folder)
            before = allocated_bytes(self.device)
            quantized = spa.load_model(str(folder), dtype="bf16", quantization="8bit", device_map="auto", attn_implementation="sdpa")
            quantized.generation_config.eos_token_id = None
            entry["quantize_seconds"] = time.perf_counter() - began
            entry["weights_allocated_mib"] = {"bf16": mib(self.weights), "8bit": mib(allocated_bytes(self.device) - before)}
            prompts, masks = bd.make_prompts(batch, s["prompt_tokens"], seed=batch)
            runs = {"spa_bf16": lambda: bd.run_engine(self.model, prompts, masks, s["new_tokens"]),
                    "spa_8bit": lambda: bd.run_engine(quantized, prompts, masks, s["new_tokens"])}
            stats, outputs = measure(runs, self.args.repeats, self.device)
            rows = {name: row(name, batch, s["new_tokens"], stats[name], None) for name in runs}
            rows["spa_8bit"]["rows_equal_to_bf16"] = rows_equal(outputs["spa_8bit"], outputs["spa_bf16"])
            entry["results"] = list(rows.values())
            cost = rows["spa_8bit"]["median_seconds"] / rows["spa_bf16"]["median_seconds"]
            entry["cost_8bit_vs_bf16"] = cost
            log(f"   batch {batch}: SPA bf16 {rows['spa_bf16']['tokens_per_second']:.1f} tok/s, 8-bit "
                f"{rows['spa_8bit']['tokens_per_second']:.1f} tok/s: 8-bit costs {cost:.2f}x")
        finally:
            del quantized
            shutil.rmtree(folder, ignore_errors=True)


def environment(device: torch.device, dtype: torch.dtype, model) -> dict:
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": version("accelerate"),
        "bitsandbytes": version("bitsandbytes"),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    if device.type == "cuda":
        env["sdpa_backends_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                        "math": torch.backends.cuda.math_sdp_enabled()}
    return env


def default_data_dir() -> Path:
    staged = REPO_ROOT / "results" / "cache" / "device"
    if (staged / INPUTS_FILE).exists():
        return staged
    return shared_data_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke: toy shape, 3 tasks, 8 new tokens (numbers mean nothing)")
    parser.add_argument("--data-dir", type=Path, help="folder holding evalplus/ (and --stage's humaneval-inputs.json); default: "
                        "results/cache/device when staged, else $SPA_DATA_DIR or ../shared/data")
    parser.add_argument("--tokenizer", type=Path, help=f"DeepSeek-Coder's tokenizer folder; default <data-dir>/tokenizers/{TOKENIZER_NAME}")
    parser.add_argument("--inputs", choices=("auto", "harness", "staged"), default="auto",
                        help="HumanEval model inputs: built by the harness (needs evalplus), read from --stage's file, or auto")
    parser.add_argument("--out", type=Path, help="default results/bench/decoding_gpu.json (smoke: results/cache/bench/decoding_gpu-smoke.json)")
    parser.add_argument("--budget-s", type=float, help="seconds for all the parts together (device 400, smoke 150)")
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up (device 3, smoke 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="measure static cache + torch.compile (default: on CUDA yes; the CPU smoke: yes, on the toy model)")
    parser.add_argument("--stage", type=Path, metavar="DIR", help="copy the data, tokenizer, model inputs and bitsandbytes for the "
                        "device into DIR and exit (run here, before the device call)")
    parser.add_argument("--stage-bitsandbytes", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    args.data_dir = (args.data_dir or default_data_dir()).resolve()
    args.tokenizer = (args.tokenizer or args.data_dir / "tokenizers" / TOKENIZER_NAME).resolve()
    if args.stage:
        stage(args.stage.resolve(), args.data_dir, args.tokenizer, args.stage_bitsandbytes)
        return

    mode = "smoke" if args.smoke else "device"
    settings = SETTINGS[mode]
    args.budget_s = args.budget_s or settings["budget_s"]
    args.repeats = args.repeats or settings["repeats"]
    if args.compile is None:
        args.compile = True
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("scripts/bench_gpu.py measures a CUDA GPU and none is visible; --smoke runs it on the CPU at a toy shape.")
    dtype = torch.bfloat16
    out = args.out or REPO_ROOT / ("results/cache/bench/decoding_gpu-smoke.json" if args.smoke else "results/bench/decoding_gpu.json")
    out = out.resolve()

    started = time.perf_counter()
    model = build_model(settings["shape"], device, dtype)
    report = {
        "benchmark": "decoding_gpu",
        "mode": mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(device, dtype, model),
        "model": {"architecture": "llama (random weights, DeepSeek-Coder-1.3B-shaped)" if not args.smoke else "llama (random weights, toy)",
                  "vocab_size": bd.VOCAB, **settings["shape"], "dtype": "bf16", "parameters": sum(p.numel() for p in model.parameters())},
        "mask_token_id": bd.MASK_ID,
        "batch_sizes": settings["batch_sizes"],
        "budget_s": args.budget_s,
        "targets": {"spa_cost_vs_plain": {f"batch_{b}": t for b, t in zip(settings["batch_sizes"], COST_TARGETS)},
                    "humaneval_seconds": HUMANEVAL_TARGET_S},
        "build_seconds": None,
        "parts": {},
    }
    bench = Bench(args, settings, device, dtype, report, out, model, started)
    bd.synchronize(device)
    bench.weights = allocated_bytes(device)
    report["build_seconds"] = time.perf_counter() - started
    log(f"bench_gpu ({mode}): {report['environment']['gpu'] or report['environment']['cpu']}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {report['model']['parameters'] / 1e6:.1f}M parameters in bf16, "
        f"attention {report['environment']['attn_implementation']}; built in {report['build_seconds']:.1f} s; budget {args.budget_s:.0f} s")
    bench.part("spa_vs_plain", bench.spa_vs_plain)
    bench.part("humaneval_full", bench.humaneval_full)
    bench.part("static_cache", bench.static_cache)
    bench.part("8bit", bench.eight_bit)
    bench.part("static_cache_compile", bench.static_cache_compile)  # last: the least predictable time
    bench.write()
    log(f"wrote {out} in {bench.elapsed():.1f} s")


if __name__ == "__main__":
    main()
