"""Decoding throughput of every method: plain greedy, SPA, CFG, CAD and PASTA on this engine, transformers' CFG and the
authors' `anchoring` package.

All run side by side in one process on the same random-weight DeepSeek-Coder-shaped Llama, the same prompts
and the same fixed number of new tokens (no EOS), at each batch size; the medians of interleaved repeats are
reported as tokens/s and as cost relative to plain greedy (time / plain time), which is the cost per token of
each method. Rows of another implementation of the same decoding are compared token for token with this
engine's (transformers' CFG with the masked prompt as negative = SPA; without a negative prompt = the engine's
CFG with the last prompt token; `anchoring` = SPA). The engine also runs with a masked view of another length
(``spa_engine_shorter_view``: the anchored stretch replaced by one mask token, as ``masking="replace"`` makes it).
PASTA (``pasta_engine``) steers every head of every layer, the most it can cost (its bias is built per steered layer).

    python scripts/bench_decoding.py                      # CPU preset (make bench) -> results/bench/decoding.json
    python scripts/bench_decoding.py --preset gpu-1.3b    # on a GPU: DeepSeek-Coder-1.3B shape, bf16
    python scripts/bench_decoding.py --preset smoke       # seconds: a toy shape, to check that everything runs
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
    # A toy shape that runs every method in seconds; its numbers mean nothing (written under results/cache/).
    "smoke": dict(config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4), device="cpu", dtype="fp32", batch_sizes=[1, 4], prompt_tokens=40,
                  new_tokens=8, repeats=1, threads=2),
}
VOCAB = 32256
MASK_ID = 32014  # DeepSeek-Coder's declared pad token <｜end▁of▁sentence｜> (protocol=evalplus; random weights: any id does)
OMEGA = 1.3
GUIDANCE_SCALE = 1.5  # CFG's default (configs/method/cfg.yaml)
ALPHA = 0.5  # CAD's default (configs/method/cad.yaml)
PASTA_ALPHA = 0.01  # PASTA's default (configs/method/pasta.yaml)


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


def replace_stretch(prompt, mask, replacement=()):
    """``prompt`` with the one contiguous anchored stretch make_prompts puts in it replaced (default: deleted)."""
    start = mask.index(True)
    return prompt[:start] + list(replacement) + prompt[start + sum(mask):]


def run_engine_shorter_view(model, prompts, masks, new_tokens):
    """The engine with a masked view of another length: the anchored stretch replaced by ONE mask token
    (as masking="replace" makes it), so the masked rows have a hole after the shared prefix."""
    masked = [replace_stretch(p, m, [MASK_ID]) for p, m in zip(prompts, masks)]
    return spa.decode(model, prompts, omega=OMEGA, masked_prompts=masked, max_new_tokens=new_tokens)


def run_engine_cfg(model, prompts, masks, new_tokens):
    """CFG on the engine: the last prompt token as negative prompt (transformers' default)."""
    return spa.decode(model, prompts, omega=GUIDANCE_SCALE, masked_prompts=[p[-1:] for p in prompts], max_new_tokens=new_tokens)


def run_engine_cad(model, prompts, masks, new_tokens):
    """CAD on the engine: omega = 1 + alpha, the anchored stretch deleted from the second view."""
    deleted = [replace_stretch(p, m) for p, m in zip(prompts, masks)]
    return spa.decode(model, prompts, omega=1 + ALPHA, masked_prompts=deleted, max_new_tokens=new_tokens)


def run_engine_pasta(model, prompts, masks, new_tokens):
    """PASTA: one view, the attention outside the anchored stretch scaled by alpha on every head."""
    return spa.pasta.decode(model, prompts, masks, alpha=PASTA_ALPHA, heads="all", max_new_tokens=new_tokens)


def run_cfg_last_token(model, prompts, masks, new_tokens):
    """transformers' own CFG without a negative prompt: its unconditional branch starts from the last prompt token."""
    ids, attention = left_padded(prompts, model.device)
    out = model.generate(input_ids=ids, attention_mask=attention, guidance_scale=GUIDANCE_SCALE, max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=MASK_ID)
    return out[:, ids.shape[1]:].tolist()


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
           "cfg_engine": run_engine_cfg, "cad_engine": run_engine_cad, "pasta_engine": run_engine_pasta, "transformers_cfg": run_cfg,
           "transformers_cfg_last_token": run_cfg_last_token, "anchoring_0.1.0": run_official}
# Other implementations of one of the engine's decodings -> that decoding; compared with it token for token.
REFERENCES = {"transformers_cfg": "spa_engine", "anchoring_0.1.0": "spa_engine", "transformers_cfg_last_token": "cfg_engine"}


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
            if name in REFERENCES:
                reference = REFERENCES[name]
                row[f"rows_equal_to_{reference}"] = sum(a == b for a, b in zip(outputs[name], outputs[reference]))
            results.append(row)
    by_key = {(r["batch_size"], r["method"]): r for r in results}
    speedups = {
        f"batch_{b}": {
            f"{reference}_throughput_vs_{other}": by_key[(b, reference)]["tokens_per_second"] / by_key[(b, other)]["tokens_per_second"]
            for other, reference in REFERENCES.items() if other in methods
        }
        for b in batch_sizes
    }
    report = {
        "benchmark": "decoding",
        "preset": args.preset,
        "model": {"architecture": "llama (random weights, DeepSeek-Coder-shaped)", "vocab_size": VOCAB, **preset["config"], "dtype": preset["dtype"]},
        "omega": OMEGA,
        "guidance_scale": GUIDANCE_SCALE,
        "alpha": ALPHA,
        "pasta_alpha": PASTA_ALPHA,
        "pasta_heads": "all",
        "prompt_tokens": preset["prompt_tokens"],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "results": results,
        "speedups": speedups,
    }
    print(f"\n{'batch':>5} {'method':<28} {'tokens/s':>10} {'cost vs plain':>14} {'rows = engine':>14}")
    for r in results:
        equal = next((v for k, v in r.items() if k.startswith("rows_equal_to_")), None)
        agree = f"{equal}/{r['batch_size']}" if equal is not None else ""
        print(f"{r['batch_size']:>5} {r['method']:<28} {r['tokens_per_second']:>10.1f} {r['cost_vs_plain']:>14.2f} {agree:>14}")
    for batch, values in speedups.items():
        print(batch, " ".join(f"{k}={v:.2f}x" for k, v in values.items()))
    default = {"cpu-small": "results/bench/decoding.json", "smoke": "results/cache/bench/decoding-smoke.json"}
    out = args.out or REPO_ROOT / default.get(args.preset, f"results/bench/decoding-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
