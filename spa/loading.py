"""Loading models and tokenizers: one function for hub ids and local paths, plus offline tiny models.

``quantization`` follows the paper (8-bit weights via bitsandbytes for every model). Tests and the
demo use :func:`build_tiny_model`: random weights in a real architecture next to a real tokenizer,
saved to disk so that they go through the very same :func:`load_model` path as a hub model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from spa.errors import ConfigError

Quantization = Literal["none", "8bit", "4bit"]
DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)}.") from None


def _quantization_config(quantization: str, compute_dtype):
    if quantization == "none":
        return None
    if quantization not in ("8bit", "4bit"):
        raise ConfigError(f"Unknown quantization {quantization!r}; use 'none', '8bit' (the paper) or '4bit'.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"quantization={quantization} needs bitsandbytes, which is not installed. Install it with "
            "`pip install -e '.[quant]'` (make install does), or set quantization=none."
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.bfloat16,
    )


def load_tokenizer(model_id: str, *, revision: str | None = None, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ConfigError(
            f"Could not load the tokenizer of {model_id!r} (revision {revision}): {str(error).splitlines()[0]} "
            "Check the model id or local path; without internet, point model.hf_id at a local folder."
        ) from None


def load_model(
    model_id: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    quantization: str = "none",
    device_map: str | dict | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """A causal LM in eval mode. ``device_map="auto"`` places it on the GPU(s) when there are any."""
    torch_dtype = _dtype(dtype)
    quantization_config = _quantization_config(quantization, torch_dtype)
    if device_map == "auto" and not torch.cuda.is_available():
        device_map = None  # accelerate's "auto" on a CPU-only machine only adds overhead
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"Could not load model {model_id!r} (revision {revision}): {str(error).splitlines()[0]} "
            "Check the id or local path; without internet, point model.hf_id at a local folder."
        ) from None
    except (RuntimeError, ValueError, ImportError) as error:
        if quantization_config is None:
            raise
        raise ConfigError(
            f"Loading {model_id!r} with quantization={quantization} failed on this machine "
            f"({'CUDA' if torch.cuda.is_available() else 'CPU only'}): {str(error).splitlines()[0]} "
            "Use quantization=none, or a bitsandbytes build that supports this device."
        ) from None
    return model.eval()


TINY_ARCHITECTURES = {
    # DeepSeek-Coder is a Llama; the others cover the attention/cache code paths of the paper's models.
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "codegen": dict(model_type="codegen", n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4, multi_query=True),
}


def tiny_config(architecture: str, vocab_size: int, **overrides):
    if architecture not in TINY_ARCHITECTURES:
        raise ConfigError(f"Unknown tiny architecture {architecture!r}; choose one of {sorted(TINY_ARCHITECTURES)}.")
    settings = {**TINY_ARCHITECTURES[architecture], **overrides}
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None, **settings)


def build_tiny_model(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    architecture: str = "llama",
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a random-weight model of ``architecture`` with the tokenizer of ``tokenizer_dir`` to ``out_dir``.

    Idempotent: an existing folder built from the same recipe is reused. Safe for parallel jobs: one builds
    it under a lock beside the folder (the others wait, then reuse it) and renames it into place, so no job
    ever sees half a model. Its outputs are meaningless by design; it exists to run the whole pipeline offline.
    """
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise ConfigError(
            f"Tokenizer folder {tokenizer_dir} not found. The tiny model uses a real tokenizer from "
            "../shared/data/tokenizers/ (set SPA_DATA_DIR or model.tokenizer_dir to where it lives)."
        )
    recipe = {"architecture": architecture, "seed": seed, "overrides": overrides, "tokenizer": tokenizer_dir.name}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    stamp = out_dir / "tiny_recipe.json"

    def built() -> bool:  # the stamp is written last and renamed in with the folder: present means complete
        return stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest

    if built():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {out_dir}: another job is building it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            _build_tiny(out_dir, tokenizer_dir, architecture, seed, overrides, {"digest": digest, **recipe})
    return out_dir


def _build_tiny(out_dir: Path, tokenizer_dir: Path, architecture: str, seed: int, overrides: dict, stamp: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Round the vocabulary up as real checkpoints do (DeepSeek-Coder: 32022 tokens, 32256 rows).
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = tiny_config(architecture, vocab_size, **overrides)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Built beside the target and renamed into place, so concurrent jobs never see half a model.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build under the same pid
    model.save_pretrained(tmp)
    # The tokenizer files are copied verbatim: re-saving through transformers 5 drops settings such as
    # DeepSeek-Coder's add_bos_token.
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, tmp / file.name)
    (tmp / "tiny_recipe.json").write_text(json.dumps(stamp, indent=2))
    if out_dir.exists():  # another recipe's model: moved aside first, since a folder cannot replace a full one
        old = out_dir.with_name(f"{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
        shutil.rmtree(old)
    os.replace(tmp, out_dir)
