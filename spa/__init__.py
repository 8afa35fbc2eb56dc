"""Selective Prompt Anchoring (SPA): exact batched decoding for Hugging Face causal LMs.

    import spa
    new_ids = spa.decode(model, prompts, anchor_masks, omega=1.3, mask_token_id=..., max_new_tokens=256)
    new_ids = spa.decode(model, prompts, omega=1.3, masked_prompts=[ids, ...], max_new_tokens=256)   # any length
    texts = spa.generate(model, tokenizer, ["<anchor>Sort the list.</anchor>\\ndef f(xs):"], omega=1.3, max_new_tokens=64)
    new_ids = spa.pasta.decode(model, prompts, anchor_masks, alpha=0.01, heads="all", max_new_tokens=256)   # PASTA
"""

from spa.engine import Sampling, combine_logits, decode
from spa.errors import ConfigError, SPAError
from spa.hf import SPALogitsProcessor
from spa.loading import build_tiny_model, load_model, load_tokenizer
from spa.masking import masked_prompt_ids, masked_view, resolve_mask_token_id
from spa.attention import measure_attention
from spa import pasta
from spa.text import AnchoredPrompt, anchor_prompt, generate, resolve_add_bos, tokenize_anchored

__all__ = [
    "AnchoredPrompt",
    "ConfigError",
    "SPAError",
    "SPALogitsProcessor",
    "Sampling",
    "anchor_prompt",
    "build_tiny_model",
    "combine_logits",
    "decode",
    "generate",
    "load_model",
    "load_tokenizer",
    "measure_attention",
    "pasta",
    "masked_prompt_ids",
    "masked_view",
    "resolve_add_bos",
    "resolve_mask_token_id",
    "tokenize_anchored",
]
