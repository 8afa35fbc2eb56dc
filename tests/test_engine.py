"""spa.decode against references: plain generate, brute-force recomputation, batching, transformers CFG, and the
baselines on the same engine (CFG with the last prompt token as negative, CAD's formula)."""

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
def brute_force_views(model, prompt, masked, omega, max_new_tokens, *, keep=None, modulated=False, eos=None, combine=None):
    """Recompute both full sequences, prompt + generated and masked prompt + generated, without any cache
    at every step. ``keep``: the masked view's attention keep-mask over ``masked`` (default: all).
    ``combine(original logits, masked logits) -> scores``: default SPA's ``combine_logits`` at ``omega``."""
    generated = []
    for _ in range(max_new_tokens):
        original_logits = model(torch.tensor([prompt + generated])).logits[0, -1]
        attend = [int(k) for k in (keep or [True] * len(masked))] + [1] * len(generated)
        masked_logits = model(torch.tensor([masked + generated]), attention_mask=torch.tensor([attend]),
                              position_ids=torch.arange(len(attend))[None]).logits[0, -1]
        if combine is not None:
            scores = combine(original_logits, masked_logits)
        else:
            scores = combine_logits(original_logits[None], masked_logits[None], omega, modulated)[0]
        generated.append(int(scores.argmax()))
        if generated[-1] == eos:
            break
    return generated


def brute_force(model, prompt, anchor_mask, omega, max_new_tokens, masking="token", modulated=False):
    """The brute force for a same-length masked view: anchored ids replaced, or hidden by attention."""
    if masking == "token":
        return brute_force_views(model, prompt, spa.masked_prompt_ids(prompt, anchor_mask, MASK_ID), omega, max_new_tokens, modulated=modulated)
    return brute_force_views(model, prompt, list(prompt), omega, max_new_tokens, keep=[not a for a in anchor_mask], modulated=modulated)


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


@pytest.mark.parametrize("modulated", [False, True])
def test_per_prompt_omegas_equal_each_prompt_decoded_alone_and_share_the_prefill(tiny_model, modulated):
    """The cells of a sweep in one call: each prompt at several omegas (the plain 1 and the masked-only 0 among
    them), token for token what each gets alone; identical views are prefilled once."""
    base, base_masks = random_prompts([11, 16, 7], seed=5)
    omegas = [1.3, 1.0, 0.0, -0.5, 1.3, 2.0]
    prompts = [p for p in base for _ in omegas]
    masks = [m for m in base_masks for _ in omegas]
    every = omegas * len(base)
    prefill_rows = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: prefill_rows.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)
    try:
        together = spa.decode(tiny_model, prompts, masks, omega=every, mask_token_id=MASK_ID, max_new_tokens=8,
                              modulated_by_prob=modulated)
    finally:
        hook.remove()
    alone = [spa.decode(tiny_model, [p], [m], omega=o, mask_token_id=MASK_ID, max_new_tokens=8, modulated_by_prob=modulated)[0]
             for p, m, o in zip(prompts, masks, every)]
    assert together == alone
    # Three chunks (both views, original only, masked only), each prefilling the three distinct prompts' rows once.
    assert prefill_rows and max(prefill_rows) <= 2 * len(base)
    chunked = spa.decode(tiny_model, prompts, masks, omega=every, mask_token_id=MASK_ID, max_new_tokens=8,
                         modulated_by_prob=modulated, batch_size=4)
    assert chunked == alone
    with pytest.raises(ValueError, match="omega holds 2 values for 18 prompts"):
        spa.decode(tiny_model, prompts, masks, omega=[1.0, 1.3], mask_token_id=MASK_ID, max_new_tokens=8)


def test_anchor_conditions_share_the_original_view_and_omegas_their_masked_view(tiny_model):
    """A group job's chunk: each prompt under two anchor conditions at two omegas. The original view is one row
    per prompt whatever the anchor and omega, each masked view one row per anchor condition: only the distinct
    rows are prefilled, and every sequence gets what it gets alone."""
    base, _ = random_prompts([12, 12, 12], seed=7)  # one length: every prompt has a real shared prefix
    conditions = [lambda n: [n // 4 <= i < n // 2 for i in range(n)], lambda n: [n // 3 <= i < (3 * n) // 4 for i in range(n)]]
    omegas = [1.3, 2.0]
    cells = [(p, condition(len(p)), omega) for p in base for condition in conditions for omega in omegas]
    prompts, masks, every = (list(column) for column in zip(*cells))
    spa.engine.head_is_affine(tiny_model)  # its one-time probe forward, out of the way
    forwards = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda module, args, output: forwards.append(tuple(args[0].shape)))
    try:
        together = spa.decode(tiny_model, prompts, masks, omega=every, mask_token_id=MASK_ID, max_new_tokens=8)
    finally:
        hook.remove()
    alone = [spa.decode(tiny_model, [p], [m], omega=o, mask_token_id=MASK_ID, max_new_tokens=8)[0] for p, m, o in cells]
    assert together == alone
    assert len(set(map(tuple, together))) > 1, "the comparison needs the conditions to decode differently"
    prefix, rest = forwards[0], forwards[1]  # the shared prefix of both views, then the columns after it
    assert prefix[0] == len(base), "one prefix row per prompt"
    assert rest[0] == len(base) * (1 + len(conditions)), "one original row per prompt, one masked row per condition"
    assert forwards[2][0] == 2 * len(cells), "decoding steps run every sequence's two rows"
    assert spa.decode(tiny_model, prompts, masks, omega=every, mask_token_id=MASK_ID, max_new_tokens=8, batch_size=3) == alone


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


# ---- Masked views of any length (masked_prompts) -------------------------------------------------


def anchored_stretch(anchor_mask):
    """(start, end) of the contiguous anchored stretch of random_prompts."""
    start = anchor_mask.index(True)
    return start, start + sum(anchor_mask)


# Masked prompts built from a prompt and its anchored stretch [a, b), as text-level masking makes them.
MASKED_VIEWS = {
    "shorter": lambda p, a, b: p[:a] + [MASK_ID] + p[b:],  # the stretch replaced by one mask token
    "longer": lambda p, a, b: p[:a] + [MASK_ID, 1, 2] * (b - a) + p[b:],  # by a mask three times as long
    "single token": lambda p, a, b: [MASK_ID],
    "deleted span": lambda p, a, b: p[:a] + p[b:],
    "deleted tail": lambda p, a, b: p[:a],  # a prefix of the prompt: its last token is shared too
}


def masked_views_of(kinds, prompts, masks):
    kinds = [kinds] * len(prompts) if isinstance(kinds, str) else kinds
    return [MASKED_VIEWS[kind](p, *anchored_stretch(m)) for kind, p, m in zip(kinds, prompts, masks)]


@pytest.mark.parametrize("kind", sorted(MASKED_VIEWS))
def test_masked_prompts_of_any_length_equal_brute_force(tiny_model, kind):
    prompts, masks = random_prompts([13, 7, 10, 4, 16], seed=2)
    masked = masked_views_of(kind, prompts, masks)
    # A strong omega: the masked view's logits weigh -2 times, so any error in that view shows.
    reference = [brute_force_views(tiny_model, p, m, 3.0, 8) for p, m in zip(prompts, masked)]
    assert spa.decode(tiny_model, prompts, omega=3.0, masked_prompts=masked, max_new_tokens=8) == reference
    assert spa.decode(tiny_model, prompts, omega=3.0, masked_prompts=masked, max_new_tokens=8, batch_size=2) == reference


def test_mixed_masked_views_prefill_their_shared_prefix_exactly(tiny_model, monkeypatch):
    import spa.engine

    prompts, masks = random_prompts([14, 9, 12, 16, 6], seed=4)
    masked = masked_views_of(["shorter", "longer", "deleted span", "shorter", "deleted tail"], prompts, masks)
    shared = []

    def recording(*args, **kwargs):
        batch = spa.views.build_views(*args, **kwargs)
        shared.append(batch.shared)
        return batch

    monkeypatch.setattr(spa.engine, "build_views", recording)
    out = spa.decode(tiny_model, prompts, omega=3.0, masked_prompts=masked, max_new_tokens=9)
    assert shared and shared[0] > 0, "views of different lengths must still share their common prefix"
    assert out == [brute_force_views(tiny_model, p, m, 3.0, 9) for p, m in zip(prompts, masked)]


def test_same_length_masked_prompts_equal_the_anchor_mask_form(tiny_model):
    prompts, masks = random_prompts([9, 14, 5])
    old_positional_form = spa.decode(tiny_model, prompts, masks, 1.3, MASK_ID, 10)
    masked = [spa.masked_prompt_ids(p, m, MASK_ID) for p, m in zip(prompts, masks)]
    assert spa.decode(tiny_model, prompts, omega=1.3, masked_prompts=masked, max_new_tokens=10) == old_positional_form


def test_masked_prompts_at_omega_one_and_zero_are_plain_greedy(tiny_model):
    prompts, masks = random_prompts([11, 6, 9])
    masked = masked_views_of("shorter", prompts, masks)
    assert spa.decode(tiny_model, prompts, omega=0.0, masked_prompts=masked, max_new_tokens=10) == [
        greedy_generate(tiny_model, m, 10) for m in masked
    ]
    plain = [greedy_generate(tiny_model, p, 10) for p in prompts]
    assert spa.decode(tiny_model, prompts, omega=1.0, masked_prompts=masked, max_new_tokens=10) == plain
    assert spa.decode(tiny_model, prompts, omega=1.0, max_new_tokens=10) == plain, "omega = 1 needs no masked view"


def test_eos_and_per_prompt_max_new_tokens():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([8, 13, 10, 6], seed=5)
    masked = masked_views_of("deleted span", prompts, masks)
    free = spa.decode(model, prompts, omega=1.4, masked_prompts=masked, max_new_tokens=20)
    eos = free[2][4]  # a token that row 2 emits at step 4
    budgets = [7, 0, 20, 3]
    out = spa.decode(model, prompts, omega=1.4, masked_prompts=masked, max_new_tokens=budgets, eos_token_id=eos)
    assert out[1] == [] and len(out[2]) <= 5
    for full, budget, cut, prompt, view in zip(free, budgets, out, prompts, masked):
        expected = full[:budget]
        assert cut == (expected[: expected.index(eos) + 1] if eos in expected else expected)
        assert cut == brute_force_views(model, prompt, view, 1.4, budget, eos=eos)
    # The old positional form takes per-prompt budgets too.
    legacy = spa.decode(model, prompts, masks, 1.4, MASK_ID, 20)
    assert spa.decode(model, prompts, masks, 1.4, MASK_ID, budgets) == [f[:b] for f, b in zip(legacy, budgets)]
    assert spa.decode(model, prompts, masks, 1.4, MASK_ID, [0] * 4) == [[]] * 4


def test_stop_rule_sees_every_token_in_order_and_ends_its_sequence():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([8, 12, 10], seed=6)
    kwargs = dict(omega=1.3, masked_prompts=masked_views_of("shorter", prompts, masks), max_new_tokens=[12, 12, 4],
                  do_sample=True, temperature=0.9, seed=5, num_samples=2)
    free = spa.decode(model, prompts, **kwargs)
    eos = free[0][1]
    seen: dict[tuple[int, int], list[int]] = {}

    def stop_after_some(prompt_index, sample_index, token):  # stateful: ends a sequence at its (3 + p + s)-th token
        seen.setdefault((prompt_index, sample_index), []).append(token)
        return len(seen[(prompt_index, sample_index)]) == 3 + prompt_index + sample_index

    out = spa.decode(model, prompts, **kwargs, eos_token_id=eos, stop_rule=stop_after_some)
    for index, ids in enumerate(out):
        p, s = divmod(index, 2)
        assert seen[(p, s)] == ids, "called once per returned token, in order, the last one (EOS too) included"
        expected = free[index][: min(3 + p + s, kwargs["max_new_tokens"][p])]
        assert ids == (expected[: expected.index(eos) + 1] if eos in expected else expected)
    assert out[0][-1] == eos, "EOS ended sequence (0, 0)"


def test_sampling_with_masked_prompts_is_seeded_and_batch_independent():
    model = make_tiny_model("qwen2")
    prompts, masks = random_prompts([8, 12, 5, 10])
    masked = masked_views_of(["shorter", "longer", "deleted span", "single token"], prompts, masks)
    kwargs = dict(omega=1.3, masked_prompts=masked, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.95, seed=11, num_samples=3)
    first = spa.decode(model, prompts, **kwargs)
    assert len(first) == 12
    assert first == spa.decode(model, prompts, **kwargs, batch_size=1) == spa.decode(model, prompts, **kwargs, batch_size=5)
    assert len({tuple(s) for s in first[:3]}) > 1, "three samples of one prompt should differ at temperature 0.8"
    assert first != spa.decode(model, prompts, **{**kwargs, "seed": 12})


def test_unfused_head_and_modulated_weighting_with_masked_prompts(monkeypatch):
    import spa.engine

    model = make_tiny_model("codegen")
    prompts, masks = random_prompts([11, 7, 9])
    masked = masked_views_of(["shorter", "longer", "deleted tail"], prompts, masks)
    fused = spa.decode(model, prompts, omega=1.7, masked_prompts=masked, max_new_tokens=8)
    modulated = spa.decode(model, prompts, omega=2.0, masked_prompts=masked, max_new_tokens=8, modulated_by_prob=True)
    monkeypatch.setattr(spa.engine, "head_is_affine", lambda model: False)
    unfused = spa.decode(model, prompts, omega=1.7, masked_prompts=masked, max_new_tokens=8)
    assert fused == unfused == [brute_force_views(model, p, m, 1.7, 8) for p, m in zip(prompts, masked)]
    assert modulated == [brute_force_views(model, p, m, 2.0, 8, modulated=True) for p, m in zip(prompts, masked)]


def test_masked_view_is_given_exactly_one_way():
    model = make_tiny_model("llama")
    prompts, masks = random_prompts([5, 6])
    masked = [p[:2] for p in prompts]
    base = dict(omega=1.2, max_new_tokens=3)
    with pytest.raises(ValueError, match="one way only"):
        spa.decode(model, prompts, masks, mask_token_id=MASK_ID, masked_prompts=masked, **base)
    with pytest.raises(ValueError, match="one way only"):
        spa.decode(model, prompts, mask_token_id=MASK_ID, masked_prompts=masked, **base)
    with pytest.raises(ValueError, match=r"omega=1.2 needs the masked view.*masked_prompts="):
        spa.decode(model, prompts, **base)
    with pytest.raises(ValueError, match="1 masked prompts for 2 prompts"):
        spa.decode(model, prompts, masked_prompts=masked[:1], **base)
    with pytest.raises(ValueError, match="masked prompt 1 is empty"):
        spa.decode(model, prompts, masked_prompts=[masked[0], []], **base)
    with pytest.raises(ValueError, match="masking='attention'.*anchor_masks instead of masked_prompts"):
        spa.decode(model, prompts, masked_prompts=masked, masking="attention", **base)
    with pytest.raises(spa.ConfigError, match=r"masking='replace'.*spa.masked_view"):
        spa.decode(model, prompts, masks, mask_token_id=MASK_ID, masking="replace", **base)
    with pytest.raises(ValueError, match="mask_token_id but no anchor_masks"):
        spa.decode(model, prompts, mask_token_id=MASK_ID, **base)
    with pytest.raises(ValueError, match="needs mask_token_id"):
        spa.decode(model, prompts, masks, **base)
    with pytest.raises(ValueError, match="3 values for 2 prompts"):
        spa.decode(model, prompts, masked_prompts=masked, omega=1.2, max_new_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        spa.decode(model, prompts, masked_prompts=masked, omega=1.2, max_new_tokens=[1, -1])
    with pytest.raises(TypeError, match="needs omega and max_new_tokens"):
        spa.decode(model, prompts, masked_prompts=masked, max_new_tokens=3)


def test_build_views_layout():
    from spa.views import build_views

    original = [[5, 6, 7, 8, 9], [5, 6]]
    masked = [[5, 6, 1, 9], [5, 6, 7, 8]]
    batch = build_views(original, masked, pad_id=0)
    # Sequence 0: the masked view is shorter; its hole sits where the views first differ (index 2).
    # Sequence 1: the original view is a prefix of the masked one; its hole goes before its last token.
    # Both are then left-padded to the widest row.
    assert batch.views == ("original", "masked")
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 1, 9], [0, 5, 0, 0, 6], [0, 5, 6, 7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [0, 1, 0, 0, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 2, 3], [0, 0, 0, 0, 1], [0, 0, 1, 2, 3]]
    assert batch.shared == 2
    assert batch.input_ids[batch.rows("masked")].tolist() == [[5, 6, 0, 1, 9], [0, 5, 6, 7, 8]]
    # One view: left padding only, no prefix to share.
    alone = build_views(original, views=("original",), pad_id=3)
    assert alone.input_ids.tolist() == [[5, 6, 7, 8, 9], [3, 3, 3, 5, 6]]
    assert alone.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]] and alone.shared == 0
    # Attention masking: ids kept, anchored keys hidden, positions unchanged; the prefix ends at the first hidden key.
    hidden = build_views(original, original, masked_keep=[[True, True, False, False, True], [True, True]])
    assert hidden.attention_mask.tolist()[1] == [1, 1, 0, 0, 1]
    assert hidden.position_ids.tolist()[1] == [0, 1, 2, 3, 4]
    assert hidden.shared == 2
    # Identical views share everything but the last column, which yields the first logits.
    assert build_views(original, original).shared == 4


# ---- Baselines on the same engine (eval/methods.py): CFG and CAD ---------------------------------


@torch.no_grad()
def transformers_cfg(model, prompt, guidance_scale, max_new_tokens, negative=None):
    """transformers' own classifier-free guidance, greedy; without ``negative`` its unconditional branch starts
    from the last prompt token."""
    extra = {} if negative is None else {"negative_prompt_ids": torch.tensor([negative])}
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         guidance_scale=guidance_scale, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=MASK_ID, **extra)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("guidance_scale", [1.5, 3.0])
def test_cfg_with_the_last_token_as_negative_equals_transformers_cfg(tiny_model, guidance_scale):
    """method=cfg (negative: last_token) is the engine with the last prompt token as second view: token for token
    transformers' generate(guidance_scale=...) without a negative prompt, batched or not."""
    prompts, _ = random_prompts([10, 15, 7], seed=8)
    negatives = [p[-1:] for p in prompts]
    out = spa.decode(tiny_model, prompts, omega=guidance_scale, masked_prompts=negatives, max_new_tokens=10)
    assert out == [transformers_cfg(tiny_model, p, guidance_scale, 10) for p in prompts]
    assert out == spa.decode(tiny_model, prompts, omega=guidance_scale, masked_prompts=negatives, max_new_tokens=10, batch_size=1)


def test_cfg_with_an_explicit_negative_of_another_length_equals_transformers_cfg(tiny_model):
    """An explicit negative prompt (here the anchored stretch deleted, shorter than the prompt) as transformers
    takes it in negative_prompt_ids."""
    prompts, masks = random_prompts([12, 9], seed=9)
    negatives = masked_views_of("deleted span", prompts, masks)
    out = spa.decode(tiny_model, prompts, omega=2.0, masked_prompts=negatives, max_new_tokens=10)
    assert out == [transformers_cfg(tiny_model, p, 2.0, 10, negative=n) for p, n in zip(prompts, negatives)]


def test_cfgs_log_softmax_combination_differs_from_raw_logits_by_one_number_per_row():
    """transformers' CFG combines log-softmaxed scores, the engine raw logits: the two differ by a constant per
    row, so argmax, softmax (any temperature), top-k and top-p choose alike (eval/methods.py)."""
    generator = torch.Generator().manual_seed(0)
    original, negative = (torch.randn(4, VOCAB, generator=generator) * 5 for _ in range(2))
    for scale in (1.5, 0.3, -1.0):
        raw = combine_logits(original, negative, scale)  # float32, as the engine combines
        log_probs = scale * torch.log_softmax(original, -1) + (1 - scale) * torch.log_softmax(negative, -1)
        shift = raw - log_probs
        assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)
        assert torch.allclose(torch.log_softmax(raw / 0.7, -1), torch.log_softmax(log_probs / 0.7, -1), atol=1e-4)
        assert torch.equal(raw.argmax(-1), log_probs.argmax(-1))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cad_equals_its_formula_by_brute_force(tiny_model, alpha):
    """method=cad: (1 + alpha) * l(prompt) - alpha * l(prompt without the anchored text), both full sequences
    recomputed every step, against the engine at omega = 1 + alpha with the anchored stretch deleted."""
    prompts, masks = random_prompts([13, 7, 10, 16], seed=10)
    deleted = masked_views_of("deleted span", prompts, masks)

    def cad(context, without):
        return (1 + alpha) * context - alpha * without

    reference = [brute_force_views(tiny_model, p, d, None, 8, combine=cad) for p, d in zip(prompts, deleted)]
    assert spa.decode(tiny_model, prompts, omega=1 + alpha, masked_prompts=deleted, max_new_tokens=8) == reference
    assert spa.decode(tiny_model, prompts, omega=1 + alpha, masked_prompts=deleted, max_new_tokens=8, batch_size=2) == reference
