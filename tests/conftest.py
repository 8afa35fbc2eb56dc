"""Shared fixtures: offline data paths and tiny random-weight models of the paper's architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from eval.benchmarks.data import load_tasks
from eval.execution.evaluate import evaluate_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SPA_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()
TOKENIZERS = DATA_DIR / "tokenizers"
ARCHITECTURES = ("llama", "gpt2", "codegen", "qwen2", "gpt_bigcode")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "evalplus").is_dir():
        pytest.fail(f"Offline data not found at {DATA_DIR}: set SPA_DATA_DIR to the shared data folder.")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer_dir(data_dir):
    def path(name: str) -> Path:
        return data_dir / "tokenizers" / name

    return path


def make_tiny_model(architecture: str, vocab_size: int = 97, dtype=torch.float64, seed: int = 0):
    """Random weights in float64, so that equality between decoding paths is exact up to argmax ties."""
    from transformers import AutoModelForCausalLM

    from spa.loading import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab_size))
    return model.to(dtype).eval()


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_model(request):
    return make_tiny_model(request.param)


def canonical_samples(benchmark: str, version: str | None = None) -> list[dict]:
    return [{"task_id": t, "solution": task["prompt"] + task["canonical_solution"]} for t, task in load_tasks(benchmark, version=version).items()]


@pytest.fixture(scope="session")
def ground_truth_cache(tmp_path_factory):
    """A fresh cache dir and ``canonical(benchmark)``: the canonical solutions' evaluation, which
    also builds the benchmark's ground-truth cache (done once per session, on first use)."""
    # Under <cache>/groundtruth, where the cell runner looks when paths.cache_dir=<cache>.
    cache_dir = tmp_path_factory.mktemp("cache") / "groundtruth"
    results: dict[str, dict] = {}

    def canonical(benchmark: str) -> dict:
        if benchmark not in results:
            results[benchmark] = evaluate_samples(benchmark, canonical_samples(benchmark), cache_dir=cache_dir, progress=False)
        return results[benchmark]

    return cache_dir, canonical
