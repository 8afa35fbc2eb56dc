"""Model loading: local paths, dtypes, 8-bit bitsandbytes on CPU (the paper's setting), clear errors."""

from __future__ import annotations

import builtins

import pytest
import torch

import spa
from eval.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tokenizer_dir, tmp_path_factory):
    # Wide enough layers that bitsandbytes' int8 path is exercised as on a real model.
    return spa.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer_dir("deepseek-coder-instruct"),
                                hidden_size=128, intermediate_size=256)


def test_tiny_model_is_reused_and_loads_with_its_tokenizer(tiny_dir, tokenizer_dir):
    stamp = (tiny_dir / "tiny_recipe.json").stat().st_mtime_ns
    assert spa.build_tiny_model(tiny_dir, tokenizer_dir("deepseek-coder-instruct"), hidden_size=128, intermediate_size=256) == tiny_dir
    assert (tiny_dir / "tiny_recipe.json").stat().st_mtime_ns == stamp, "an identical recipe must not be rebuilt"
    tokenizer = spa.load_tokenizer(str(tiny_dir))
    assert spa.resolve_add_bos(tokenizer) is True, "the copied tokenizer_config keeps DeepSeek's add_bos_token"
    model = spa.load_model(str(tiny_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.vocab_size == 32064 and model.config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize("quantization, layer, tolerance", [("8bit", "Linear8bitLt", 0.05), ("4bit", "Linear4bit", 0.5)])
def test_quantized_weights_on_cpu(tiny_dir, quantization, layer, tolerance):
    """bitsandbytes runs on this CPU, so the paper's 8-bit setting is tested here, not only on a GPU."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    reference = spa.load_model(str(tiny_dir), dtype="fp32")
    quantized = spa.load_model(str(tiny_dir), dtype="fp32", quantization=quantization)
    layers = [m for m in quantized.modules() if isinstance(m, getattr(bitsandbytes.nn, layer))]
    assert len(layers) == 7 * quantized.config.num_hidden_layers  # every linear of every block; the head stays full
    assert layers[0].weight.dtype in (torch.int8, torch.uint8)
    ids = torch.tensor([[32013, 10, 200, 3000, 42, 7, 99]])
    with torch.no_grad():
        diff = (quantized(ids).logits.float() - reference(ids).logits).abs().max().item()
    assert 0 < diff < tolerance
    out = spa.decode(quantized, [ids[0].tolist()], [[False, False, True, True, False, False, False]], omega=1.3,
                     mask_token_id=32014, max_new_tokens=5)
    assert len(out[0]) == 5


def test_clear_errors(tiny_dir, monkeypatch):
    with pytest.raises(ConfigError, match="Unknown quantization"):
        spa.load_model(str(tiny_dir), quantization="3bit")
    with pytest.raises(ConfigError, match="Unknown dtype"):
        spa.load_model(str(tiny_dir), dtype="float8")
    with pytest.raises(ConfigError, match="Could not load model"):
        spa.load_model(str(tiny_dir / "missing"))
    real_import = builtins.__import__

    def without_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_bitsandbytes)
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        spa.load_model(str(tiny_dir), quantization="8bit")


def test_parallel_builds_of_one_tiny_model_never_expose_half_a_model(tokenizer_dir, tmp_path):
    """The issue's failure: a job loaded the tiny model's folder while another was still writing it."""
    import multiprocessing

    target, tokenizers = tmp_path / "tiny", tokenizer_dir("deepseek-coder-instruct")
    context = multiprocessing.get_context("fork")
    with context.Pool(3) as pool:
        built = pool.starmap(_build_and_load, [(target, tokenizers)] * 3)
    assert built == [32064] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"], "nothing left aside"


def _build_and_load(target, tokenizers) -> int:
    return spa.load_model(str(spa.build_tiny_model(target, tokenizers)), dtype="fp32").config.vocab_size
