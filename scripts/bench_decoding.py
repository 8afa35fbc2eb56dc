"""Decoding throughput: plain greedy vs this SPA engine vs transformers CFG vs the authors' `anchoring` package.

All four run side by side in one process on the same random-weight DeepSeek-Coder-shaped Llama, the
same prompts and the same fixed number of new tokens (no EOS), at each batch size; the medians of
interleaved repeats are reported as tokens/s and as cost relative to plain greedy (time / plain time).
It also reports how many rows of each SPA implementation agree token for token with this engine. The
engine also runs with a masked view of another length (``spa_engine_shorter_view``: the anchored
stretch replaced by one mask token, as ``masking="replace"`` makes it), timed only.

    python scripts/bench_decoding.py                      # CPU preset (make bench)
    python scripts/bench_decoding.py --preset gpu-1.3b    # on a GPU: DeepSeek-Coder-1.3B shape, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import spa  # noqa: E402
from spa.masking import masked_prompt_ids  # noqa: E402
from spa.views import build_views  # noqa: E402

PRESETS = {
    # Issue 2's CPU reference shape: hidden 512, 8 layers, DeepSeek-Coder's vocabulary.
    "cpu-small": dict(config=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=8), device="cpu", dtype="fp32", batch_sizes=[1, 16], prompt_tokens=150,
                      new_tokens=128, repeats=3, threads=2),
    # DeepSeek-Coder-1.3B's shape (hidden 2048, 24 layers, 16 heads, intermediate 5504).
    "gpu-1.3b": dict(config=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                                 num_key_value_heads=16, max_position_embeddings=16384), device="cuda", dtype="bf16",
                     batch_sizes=[1, 32], prompt_tokens=150, new_tokens=128, repeats=5, threads=None),
}
VOCAB = 32256
MASK_ID = 32014  # DeepSeek-Coder's <pad>, the authors' mask token for it
OMEGA = 1.3


def make_prompts(batch: int, prompt_tokens: int, seed: int):
    """Prompts of slightly different lengths (left padding matters) with an anchored middle stretch."""
    generator = torch.Generator().manual_seed(seed)
    prompts, masks = [], []
    for i in range(batch):
        length = prompt_tokens - (i * 7) % 21 if batch > 1 else prompt_tokens
        prompts.append(torch.randint(100, 32000, (length,), generator=generator).tolist())
        masks.append([length // 3 <= j < (2 * length) // 3 for j in range(length)])
    return prompts, masks


def left_padded(rows, device):
    """(ids, attention mask) of one view, left-padded as spa.views lays it out."""
    batch = build_views(rows, views=("original",), pad_id=MASK_ID, device=device)
    return batch.input_ids, batch.attention_mask


def run_plain(model, prompts, masks, new_tokens):
    ids, attention = left_padded(prompts, model.device)
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=MASK_ID)
    return out[:, ids.shape[1]:].tolist()


def run_engine(model, prompts, masks, new_tokens):
    return spa.decode(model, prompts, masks, omega=OMEGA, mask_token_id=MASK_ID, max_new_tokens=new_tokens)


def run_engine_shorter_view(model, prompts, masks, new_tokens):
    """The engine with a masked view of another length: the anchored stretch replaced by ONE mask token
    (as masking="replace" makes it), so the masked rows have a hole after the shared prefix."""
    masked = []
    for prompt, mask in zip(prompts, masks):
        start = mask.index(True)  # make_prompts anchors one contiguous stretch
        masked.append(prompt[:start] + [MASK_ID] + prompt[start + sum(mask):])
    return spa.decode(model, prompts, omega=OMEGA, masked_prompts=masked, max_new_tokens=new_tokens)


def run_cfg(model, prompts, masks, new_tokens):
    ids, attention = left_padded(prompts, model.device)
    negative, negative_attention = left_padded([masked_prompt_ids(p, m, MASK_ID) for p, m in zip(prompts, masks)], model.device)
    out = model.generate(input_ids=ids, attention_mask=attention, guidance_scale=OMEGA, negative_prompt_ids=negative,
                         negative_prompt_attention_mask=negative_attention, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=MASK_ID)
    return out[:, ids.shape[1]:].tolist()


def run_official(model, prompts, masks, new_tokens):
    from anchoring import SPALogitsProcessor

    ids, attention = left_padded(prompts, model.device)
    masked, _ = left_padded([masked_prompt_ids(p, m, MASK_ID) for p, m in zip(prompts, masks)], model.device)
    # The package's own settings for plain SPA: no probability modulation, no attention-mask variant.
    processor = SPALogitsProcessor(aux_model=model, aux_input_ids=masked, mask_token=None, strength=OMEGA,
                                   modulated_by_prob=False, use_attention_mask=False)
    out = model.generate(input_ids=ids, attention_mask=attention, logits_processor=[processor], max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=MASK_ID)
    return out[:, ids.shape[1]:].tolist()


METHODS = {"plain_greedy": run_plain, "spa_engine": run_engine, "spa_engine_shorter_view": run_engine_shorter_view,
           "transformers_cfg": run_cfg, "anchoring_0.1.0": run_official}
# The implementations of the same SPA as spa_engine (same masked view), compared with it token for token.
SAME_SPA = ("transformers_cfg", "anchoring_0.1.0")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    batch_sizes = args.batch_sizes or preset["batch_sizes"]
    repeats = args.repeats or preset["repeats"]
    new_tokens = args.new_tokens or preset["new_tokens"]
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    device = torch.device(preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"Preset {args.preset} needs a CUDA GPU; none is visible. Use --preset cpu-small.")
    methods = dict(METHODS)
    try:
        import anchoring  # noqa: F401
    except ImportError:
        print("note: the authors' package `anchoring` is not installed (pip install anchoring==0.1.0); skipping it")
        methods.pop("anchoring_0.1.0")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, **preset["config"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[preset["dtype"]]
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()

    results = []
    for batch in batch_sizes:
        prompts, masks = make_prompts(batch, preset["prompt_tokens"], seed=batch)
        outputs, times = {}, {name: [] for name in methods}
        with torch.inference_mode():
            for name, run in methods.items():  # warm-up, and the outputs compared below
                outputs[name] = run(model, prompts, masks, new_tokens)
            for _ in range(repeats):  # interleaved so that drifts in machine load hit every method alike
                for name, run in methods.items():
                    synchronize(device)
                    start = time.perf_counter()
                    run(model, prompts, masks, new_tokens)
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
        plain = statistics.median(times["plain_greedy"])
        for name in methods:
            seconds = statistics.median(times[name])
            row = {
                "batch_size": batch,
                "method": name,
                "median_seconds": seconds,
                "tokens_per_second": batch * new_tokens / seconds,
                "cost_vs_plain": seconds / plain,
                "all_seconds": times[name],
            }
            if name in SAME_SPA:
                row["rows_equal_to_spa_engine"] = sum(a == b for a, b in zip(outputs[name], outputs["spa_engine"]))
            results.append(row)
    by_key = {(r["batch_size"], r["method"]): r for r in results}
    speedups = {
        f"batch_{b}": {
            f"spa_engine_throughput_vs_{other}": by_key[(b, "spa_engine")]["tokens_per_second"] / by_key[(b, other)]["tokens_per_second"]
            for other in methods if other in SAME_SPA
        }
        for b in batch_sizes
    }
    report = {
        "benchmark": "decoding",
        "preset": args.preset,
        "model": {"architecture": "llama (random weights, DeepSeek-Coder-shaped)", "vocab_size": VOCAB, **preset["config"], "dtype": preset["dtype"]},
        "omega": OMEGA,
        "prompt_tokens": preset["prompt_tokens"],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "results": results,
        "speedups": speedups,
    }
    print(f"\n{'batch':>5} {'method':<24} {'tokens/s':>10} {'cost vs plain':>14} {'rows = engine':>14}")
    for r in results:
        agree = f"{r['rows_equal_to_spa_engine']}/{r['batch_size']}" if "rows_equal_to_spa_engine" in r else ""
        print(f"{r['batch_size']:>5} {r['method']:<24} {r['tokens_per_second']:>10.1f} {r['cost_vs_plain']:>14.2f} {agree:>14}")
    for batch, values in speedups.items():
        print(batch, " ".join(f"{k}={v:.2f}x" for k, v in values.items()))
    out = args.out or REPO_ROOT / "results" / "bench" / ("decoding.json" if args.preset == "cpu-small" else f"decoding-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
