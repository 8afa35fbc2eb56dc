"""spa.decode against references: plain generate, brute-force recomputation, batching, transformers CFG."""

from __future__ import annotations

import pytest
import torch

import spa
from spa.engine import combine_logits
from tests.conftest import make_tiny_model

MASK_ID = 0
VOCAB = 97


def random_prompts(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    # Anchor a contiguous middle stretch, as a task description inside a prompt would be.
    masks = [[n // 4 <= i < (3 * n) // 4 for i in range(n)] for n in lengths]
    return prompts, masks


@torch.no_grad()
def greedy_generate(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=MASK_ID)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def brute_force(model, prompt, anchor_mask, omega, max_new_tokens, masking="token", modulated=False):
    """Recompute both full sequences without any cache at every step."""
    masked = spa.masked_prompt_ids(prompt, anchor_mask, MASK_ID) if masking == "token" else list(prompt)
    generated = []
    for _ in range(max_new_tokens):
        original_logits = model(torch.tensor([prompt + generated])).logits[0, -1]
        keep = [0 if (masking == "attention" and a) else 1 for a in anchor_mask] + [1] * len(generated)
        masked_logits = model(torch.tensor([masked + generated]), attention_mask=torch.tensor([keep]),
                              position_ids=torch.arange(len(keep))[None]).logits[0, -1]
        scores = combine_logits(original_logits[None], masked_logits[None], omega, modulated)[0]
        generated.append(int(scores.argmax()))
    return generated


def test_omega_one_equals_plain_greedy(tiny_model):
    prompts, masks = random_prompts([9, 14, 5])
    out = spa.decode(tiny_model, prompts, masks, omega=1.0, mask_token_id=MASK_ID, max_new_tokens=12)
    assert out == [greedy_generate(tiny_model, p, 12) for p in prompts]


def test_omega_zero_equals_plain_greedy_on_masked_prompt(tiny_model):
    prompts, masks = random_prompts([11, 6])
    out = spa.decode(tiny_model, prompts, masks, omega=0.0, mask_token_id=MASK_ID, max_new_tokens=12)
    assert out == [greedy_generate(tiny_model, spa.masked_prompt_ids(p, m, MASK_ID), 12) for p, m in zip(prompts, masks)]


@pytest.mark.parametrize("masking", ["token", "attention"])
def test_spa_equals_brute_force_reference(tiny_model, masking):
    prompts, masks = random_prompts([13, 7, 10])
    out = spa.decode(tiny_model, prompts, masks, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=10, masking=masking)
    assert out == [brute_force(tiny_model, p, m, 1.3, 10, masking) for p, m in zip(prompts, masks)]


def test_spa_changes_tokens():
    """The comparison above would be vacuous if anchoring never changed the argmax."""
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([12, 9, 15, 8])
    plain = spa.decode(model, prompts, masks, omega=1.0, mask_token_id=MASK_ID, max_new_tokens=16)
    anchored = spa.decode(model, prompts, masks, omega=3.0, mask_token_id=MASK_ID, max_new_tokens=16)
    assert plain != anchored


@pytest.mark.parametrize("omega", [1.3, -0.5, 0.6])
def test_batch_of_different_lengths_equals_one_by_one(tiny_model, omega):
    prompts, masks = random_prompts([4, 17, 9, 12, 6], seed=3)
    batched = spa.decode(tiny_model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=10)
    chunked = spa.decode(tiny_model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=10, batch_size=2)
    single = [spa.decode(tiny_model, [p], [m], omega=omega, mask_token_id=MASK_ID, max_new_tokens=10)[0] for p, m in zip(prompts, masks)]
    assert batched == single
    assert chunked == single


def test_equals_transformers_classifier_free_guidance(tiny_model):
    prompts, masks = random_prompts([10, 15])
    omega = 1.5
    out = spa.decode(tiny_model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=10)
    for prompt, mask, ids in zip(prompts, masks, out):
        negative = torch.tensor([spa.masked_prompt_ids(prompt, mask, MASK_ID)])
        with torch.no_grad():
            cfg = tiny_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      guidance_scale=omega, negative_prompt_ids=negative, max_new_tokens=10,
                                      do_sample=False, eos_token_id=None, pad_token_id=MASK_ID)
        assert ids == cfg[0, len(prompt):].tolist()


def test_stops_after_first_eos_and_drops_finished_rows():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([8, 13, 10, 6], seed=5)
    free = spa.decode(model, prompts, masks, omega=1.4, mask_token_id=MASK_ID, max_new_tokens=20)
    eos = free[1][4]  # a token that row 1 emits at step 4
    stopped = spa.decode(model, prompts, masks, omega=1.4, mask_token_id=MASK_ID, max_new_tokens=20, eos_token_id=eos)
    for full, cut in zip(free, stopped):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert len(stopped[1]) <= 5


def test_stopping_criteria_see_generated_ids_only():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([8, 12])
    free = spa.decode(model, prompts, masks, omega=1.2, mask_token_id=MASK_ID, max_new_tokens=12)

    def stop_after_three(input_ids, scores):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3)

    out = spa.decode(model, prompts, masks, omega=1.2, mask_token_id=MASK_ID, max_new_tokens=12, stopping_criteria=[stop_after_three])
    assert out == [f[:3] for f in free]


def test_modulated_by_prob_is_per_row(tiny_model):
    prompts, masks = random_prompts([9, 14, 6], seed=7)
    out = spa.decode(tiny_model, prompts, masks, omega=2.0, mask_token_id=MASK_ID, max_new_tokens=8, modulated_by_prob=True)
    assert out == [brute_force(tiny_model, p, m, 2.0, 8, modulated=True) for p, m in zip(prompts, masks)]


def test_modulated_weighting_formula():
    original = torch.tensor([[2.0, 1.0, 0.0]])
    masked = torch.tensor([[0.0, 1.0, 2.0]])
    probs = torch.softmax(original, -1)
    expected = original + (1.5 - 1) * probs / probs.max() * (original - masked)
    assert torch.allclose(combine_logits(original, masked, 1.5, modulated_by_prob=True), expected)
    # |omega| <= 1: the plain SPA formula, as in the authors' package.
    assert torch.allclose(combine_logits(original, masked, 0.5, modulated_by_prob=True), 0.5 * original + 0.5 * masked)


def test_sampling_is_reproducible_and_independent_of_batching():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([8, 12, 5])
    kwargs = dict(omega=1.3, mask_token_id=MASK_ID, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.95, seed=11, num_samples=3)
    first = spa.decode(model, prompts, masks, **kwargs)
    assert len(first) == 9
    assert first == spa.decode(model, prompts, masks, **kwargs, batch_size=2)
    assert len({tuple(s) for s in first[:3]}) > 1, "three samples of one prompt should differ at temperature 0.8"
    assert first != spa.decode(model, prompts, masks, **{**kwargs, "seed": 12})


def test_top_k_one_sampling_is_greedy():
    model = make_tiny_model("qwen2")
    prompts, masks = random_prompts([8, 12])
    greedy = spa.decode(model, prompts, masks, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=10)
    sampled = spa.decode(model, prompts, masks, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=10, do_sample=True, top_k=1, seed=3)
    assert sampled == greedy


def test_bad_arguments_raise():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([5])
    with pytest.raises(ValueError, match="anchor mask"):
        spa.decode(model, prompts, [masks[0][:-1]], omega=1.2, mask_token_id=MASK_ID, max_new_tokens=3)
    with pytest.raises(TypeError, match="Unknown sampling"):
        spa.decode(model, prompts, masks, omega=1.2, mask_token_id=MASK_ID, max_new_tokens=3, beams=2)
    with pytest.raises(Exception, match="masking"):
        spa.decode(model, prompts, masks, omega=1.2, mask_token_id=MASK_ID, max_new_tokens=3, masking="embedding")


def test_unfused_head_path_equals_brute_force(monkeypatch):
    """Half-precision models combine per-view logits instead of hidden states; both paths are exact."""
    import spa.engine

    model = make_tiny_model("codegen")  # CodeGen's head has a bias: the affine identity must hold with it
    assert spa.engine.head_is_affine(model)
    prompts, masks = random_prompts([11, 7])
    fused = spa.decode(model, prompts, masks, omega=1.7, mask_token_id=MASK_ID, max_new_tokens=8)
    monkeypatch.setattr(spa.engine, "head_is_affine", lambda model: False)
    unfused = spa.decode(model, prompts, masks, omega=1.7, mask_token_id=MASK_ID, max_new_tokens=8)
    assert fused == unfused == [brute_force(model, p, m, 1.7, 8) for p, m in zip(prompts, masks)]


def test_no_anchored_token_means_plain_decoding():
    model = make_tiny_model("llama")
    prompts, _ = random_prompts([9, 6])
    none = [[False] * len(p) for p in prompts]
    assert spa.decode(model, prompts, none, omega=2.0, mask_token_id=MASK_ID, max_new_tokens=8) == [greedy_generate(model, p, 8) for p in prompts]


def test_nan_logits_fail_loudly():
    """transformers' eager attention in float64 turns left-padded batches into NaN: an error, not garbage."""
    model = make_tiny_model("llama")
    model.set_attn_implementation("eager")
    prompts, masks = random_prompts([5, 12])
    with pytest.raises(ValueError, match="NaN logits"):
        spa.decode(model, prompts, masks, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=4)
    assert spa.decode(model, prompts[:1], masks[:1], omega=1.3, mask_token_id=MASK_ID, max_new_tokens=4)
