"""spa.attention: prompt shares of self-attention and gradients, against known values and references."""

from __future__ import annotations

import pytest
import torch

import spa
from eval.errors import ConfigError
from spa.attention import (
    AttentionWeightsUnavailable,
    GradientsUnavailable,
    context_shares,
    gradient_prompt_shares,
    last_row_shares,
    measure_attention,
)
from spa.engine import combine_logits
from tests.conftest import ARCHITECTURES, make_tiny_model
from tests.test_engine import MASK_ID, random_prompts

# float32, not the float64 of the engine tests: in float64, transformers' eager attention turns the
# left-padding mask into -inf and padded rows into NaN (see test_float64_padding_gives_clear_error).
DTYPE = torch.float32
TOLERANCE = 1e-5


def eager_model(architecture: str, seed: int = 0):
    model = make_tiny_model(architecture, dtype=DTYPE, seed=seed)
    model.set_attn_implementation("eager")
    return model


def task_ids(n: int) -> list[str]:
    return [f"task/{i}" for i in range(n)]


def assert_valid(record: dict) -> None:
    for steps_key, share_key in (("self_steps", "self_prompt_share"), ("grad_steps", "grad_prompt_share")):
        steps, shares = record[steps_key], record[share_key]
        assert len(steps) == len(shares)
        assert steps == sorted(set(steps)) and all(0 <= t < record["n_generated"] for t in steps)
        assert all(-TOLERANCE <= s <= 1 + TOLERANCE for s in shares)
        if steps and steps[0] == 0:
            assert shares[0] == pytest.approx(1.0, abs=TOLERANCE), "at step 0 the whole context is prompt"


def test_context_shares_of_a_padded_row():
    # 2 padding columns (zero), 3 prompt tokens, 2 generated tokens.
    scores = torch.tensor([[0.0, 0.0, 0.1, 0.2, 0.3, 0.25, 0.15], [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]])
    prompt, generated = context_shares(scores, torch.tensor([3, 2]), torch.tensor([2, 2]))
    assert prompt.tolist() == pytest.approx([0.6, 1.0])
    assert generated.tolist() == pytest.approx([0.4, 0.0])
    # Mass on padding is not hidden: the shares then sum to less than 1.
    prompt, generated = context_shares(torch.tensor([0.5, 0.25, 0.25]), 1, 1)
    assert float(prompt + generated) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not fit"):
        context_shares(scores, 6, 2)


def uniform_last_layer(model):
    """Zero the last layer's query and key projections: all scores are 0, so causal attention is uniform."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            attention = model.transformer.h[-1].attn.c_attn  # Conv1D packing [q | k | v] along the output
            width = model.config.n_embd
            attention.weight[:, : 2 * width] = 0
            attention.bias[: 2 * width] = 0
        else:
            attention = model.model.layers[-1].self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
    return model


@pytest.mark.parametrize("omega", [1.0, 1.5, 0.0])
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_uniform_attention_gives_prompt_length_over_context_length(architecture, omega):
    model = uniform_last_layer(eager_model(architecture))
    lengths = [9, 14, 5, 11]  # left padding, and an anchored middle: SPA prefills a shared prefix
    prompts, masks = random_prompts(lengths)
    records = measure_attention(model, prompts, masks, task_ids(4), omega=omega, mask_token_id=MASK_ID,
                                max_new_tokens=12, grad_every=None, progress=False)
    for record, n_prompt in zip(records, lengths):
        assert record["n_prompt_tokens"] == n_prompt and record["n_generated"] == 12
        assert record["self_steps"] == list(range(12))
        expected = [n_prompt / (n_prompt + t) for t in range(12)]
        assert record["self_prompt_share"] == pytest.approx(expected, abs=1e-6)
        assert record["grad_steps"] == record["grad_prompt_share"] == []


def full_forward_shares(model, prompt: list[int], generated: list[int], steps: list[int]) -> list[float]:
    """The shares read from ONE uncached forward over prompt + generated tokens with every attention row."""
    with torch.no_grad():
        attention = model(torch.tensor([prompt + generated]), output_attentions=True).attentions[-1][0].mean(dim=0)
    n = len(prompt)
    # Row n - 1 + t is the query that predicts generated token t; it sees keys 0 .. n - 1 + t.
    return [float(attention[n - 1 + t, :n].sum() / attention[n - 1 + t, : n + t].sum()) for t in steps]


@pytest.mark.parametrize("omega", [1.0, 1.7])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cached_row_equals_full_forward(architecture, omega):
    model = eager_model(architecture)
    prompts, masks = random_prompts([8, 13, 10, 6], seed=5)
    free = spa.decode(model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=14)
    eos = free[1][4]  # sequences stop at different steps: rows leave the batch mid-way
    records = measure_attention(model, prompts, masks, task_ids(4), omega=omega, mask_token_id=MASK_ID,
                                max_new_tokens=14, eos_token_id=eos, grad_every=None, batch_size=3, progress=False)
    generated = spa.decode(model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=14, eos_token_id=eos)
    assert len(generated[1]) <= 5
    for record, prompt, ids in zip(records, prompts, generated):
        assert_valid(record)
        assert record["n_generated"] == len(ids) and record["self_steps"] == list(range(len(ids)))
        expected = full_forward_shares(model, prompt, ids, record["self_steps"])
        assert record["self_prompt_share"] == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("masking", ["token", "attention"])
def test_prompt_and_generated_shares_sum_to_one_on_padded_rows(masking):
    """Every row of both views, padding and shared-prefix prefill included, puts all its weight on real keys."""
    model = eager_model("llama")
    prompts, masks = random_prompts([4, 17, 9, 12], seed=3)
    sums, shares = [], []

    def observer(step, outputs, sequence_keys, views):
        n_prompt = torch.tensor([len(prompts[p]) for p, _ in sequence_keys]).repeat_interleave(len(views))
        prompt, generated = last_row_shares(outputs.attentions[-1], step, n_prompt)
        sums.append(prompt + generated)
        shares.append(prompt)

    spa.decode(model, prompts, masks, omega=1.4, mask_token_id=MASK_ID, max_new_tokens=10, masking=masking,
               observer=observer, forward_kwargs={"output_attentions": True})
    assert len(sums) == 10
    assert torch.allclose(torch.cat(sums), torch.tensor(1.0), atol=1e-6)
    assert bool(((torch.cat(shares) >= 0) & (torch.cat(shares) <= 1 + 1e-6)).all())


def test_steps_and_tasks_are_subsampled():
    model = eager_model("qwen2")
    prompts, masks = random_prompts([8, 13, 10], seed=5)
    eos = spa.decode(model, prompts, masks, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=11)[0][6]
    ids = task_ids(3)
    records = measure_attention(model, prompts, masks, ids, omega=1.3, mask_token_id=MASK_ID, max_new_tokens=11,
                                eos_token_id=eos, self_every=3, grad_every=4, grad_task_ids=ids[1:], progress=False)
    assert [r["task_id"] for r in records] == ids
    assert records[0]["n_generated"] <= 7
    for record in records:
        assert_valid(record)
        assert record["self_steps"] == list(range(0, record["n_generated"], 3))
    assert records[0]["grad_steps"] == records[0]["grad_prompt_share"] == []
    for record in records[1:]:
        assert record["grad_steps"] == list(range(0, record["n_generated"], 4))
    # Self-attention off: no eager attention needed (this model keeps sdpa).
    plain = measure_attention(make_tiny_model("llama", dtype=DTYPE), prompts, masks, ids, omega=1.0, mask_token_id=MASK_ID,
                              max_new_tokens=5, self_every=None, grad_every=2, progress=False)
    assert all(r["self_steps"] == [] and r["grad_steps"] == [0, 2, 4] for r in plain)


def reference_gradient_share(model, prompt, anchor_mask, generated, step, omega, masking) -> float:
    """Eq. 21-22 for one step, unbatched and unpadded: one forward per view, gradient of the combined logit."""
    ids = torch.tensor(prompt + generated[:step])
    anchored = torch.tensor(anchor_mask + [False] * step)
    embedding = model.get_input_embeddings()
    embeds = embedding(ids).detach().requires_grad_(True)
    original = model(inputs_embeds=embeds[None]).logits[0, -1]
    if masking == "token":
        masked = model(inputs_embeds=torch.where(anchored[:, None], embedding(torch.tensor(MASK_ID)), embeds)[None]).logits[0, -1]
    else:
        masked = model(inputs_embeds=embeds[None], attention_mask=(~anchored).long()[None],
                       position_ids=torch.arange(len(ids))[None]).logits[0, -1]
    logit = combine_logits(original[None], masked[None], omega)[0, generated[step]]
    (gradient,) = torch.autograd.grad(logit, embeds)
    norms = gradient.norm(dim=-1)
    return float(norms[: len(prompt)].sum() / norms.sum())


@pytest.mark.parametrize("omega,masking", [(1.0, "token"), (1.5, "token"), (1.5, "attention"), (0.0, "token")])
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # rotary positions ignore a shift; gpt2's do not
def test_gradient_share_equals_direct_autograd(architecture, omega, masking):
    model = eager_model(architecture, seed=2)
    prompts, masks = random_prompts([9, 12], seed=7)
    records = measure_attention(model, prompts, masks, task_ids(2), omega=omega, mask_token_id=MASK_ID, max_new_tokens=9,
                                masking=masking, self_every=None, grad_every=2, grad_batch_size=3, progress=False)
    generated = spa.decode(model, prompts, masks, omega=omega, mask_token_id=MASK_ID, max_new_tokens=9, masking=masking)
    assert all(p.grad is None for p in model.parameters()), "parameters must receive no gradient"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"
    for record, prompt, mask, ids in zip(records, prompts, masks, generated):
        assert_valid(record)
        assert record["grad_steps"] == [0, 2, 4, 6, 8]
        expected = [reference_gradient_share(model, prompt, mask, ids, t, omega, masking) for t in record["grad_steps"]]
        assert record["grad_prompt_share"] == pytest.approx(expected, abs=TOLERANCE)
        assert 0.0 < min(record["grad_prompt_share"][1:]) < max(record["grad_prompt_share"][1:]) < 1.0


@pytest.mark.parametrize("omega", [1.0, 1.5])
def test_gradient_share_when_positions_do_not_mix(omega):
    """With every attention output projection zeroed, a logit depends on its own position's token only:
    the last context token, which is a prompt token at step 0 and a generated one afterwards."""
    model = eager_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    prompts, masks = random_prompts([7, 10])
    records = measure_attention(model, prompts, masks, task_ids(2), omega=omega, mask_token_id=MASK_ID, max_new_tokens=8,
                                self_every=None, grad_every=1, grad_batch_size=4, progress=False)
    for record in records:
        assert record["grad_prompt_share"] == [1.0] + [0.0] * 7


def test_8bit_weights_give_gradients_close_to_full_precision(tokenizer_dir, tmp_path_factory):
    """bitsandbytes' backward goes through the dequantized weights, so 8-bit models are measurable."""
    pytest.importorskip("bitsandbytes")
    path = spa.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer_dir("deepseek-coder-instruct"),
                                hidden_size=128, intermediate_size=256)
    reference = spa.load_model(str(path), dtype="fp32", attn_implementation="eager")
    quantized = spa.load_model(str(path), dtype="fp32", quantization="8bit", attn_implementation="eager")
    prompts = [[32013, 10, 200, 3000, 42, 7, 99, 512], [32013, 77, 1500, 8]]
    masks = [[False, False, True, True, True, False, False, False], [False, True, True, False]]
    generated = spa.decode(reference, prompts, masks, omega=1.3, mask_token_id=32014, max_new_tokens=6)
    for prompt, mask, ids in zip(prompts, masks, generated):
        kwargs = dict(omega=1.3, mask_token_id=32014, batch_size=3)
        full = gradient_prompt_shares(reference, prompt, mask, ids, [0, 2, 4], **kwargs)
        int8 = gradient_prompt_shares(quantized, prompt, mask, ids, [0, 2, 4], **kwargs)
        assert int8 == pytest.approx(full, abs=0.02)
    for record in measure_attention(quantized, prompts, masks, task_ids(2), omega=1.3, mask_token_id=32014,
                                    max_new_tokens=6, grad_every=2, progress=False):
        assert_valid(record)
        assert len(record["self_steps"]) == record["n_generated"] and len(record["grad_steps"]) == 3


class _NoBackward(torch.autograd.Function):
    """Identity whose backward is missing, as in inference-only quantized kernels."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("this kernel has no backward")


@pytest.mark.parametrize("breakage", ["kernel without backward", "detached forward"])
def test_model_without_input_gradients_fails_clearly_before_decoding(breakage, monkeypatch):
    model = eager_model("llama")
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    if breakage == "kernel without backward":
        monkeypatch.setattr(mlp, "forward", lambda x: _NoBackward.apply(forward(x)))
    else:
        monkeypatch.setattr(model.model, "forward", torch.no_grad()(model.model.forward))
    monkeypatch.setattr(spa.attention, "decode", lambda *args, **kwargs: pytest.fail("decoded before the gradient check"))
    prompts, masks = random_prompts([6])
    with pytest.raises(GradientsUnavailable, match=r"quantization=none.*grad_every=null"):
        measure_attention(model, prompts, masks, task_ids(1), omega=1.5, mask_token_id=MASK_ID, max_new_tokens=4, progress=False)


def test_attention_weights_need_eager_attention():
    model = make_tiny_model("llama", dtype=DTYPE)  # sdpa: no attention weights
    prompts, masks = random_prompts([6, 9])
    with pytest.raises(AttentionWeightsUnavailable, match="attn_implementation='eager'"):
        measure_attention(model, prompts, masks, task_ids(2), omega=1.5, mask_token_id=MASK_ID, max_new_tokens=4,
                          grad_every=None, progress=False)


def test_float64_padding_gives_clear_error():
    model = make_tiny_model("llama")  # float64
    model.set_attn_implementation("eager")
    prompts, masks = random_prompts([6, 9])
    with pytest.raises(ConfigError, match="dtype=fp32"):
        measure_attention(model, prompts, masks, task_ids(2), omega=1.0, mask_token_id=MASK_ID, max_new_tokens=4,
                          grad_every=None, progress=False)
    # One prompt per batch needs no padding, and float64 then works.
    records = measure_attention(model, prompts, masks, task_ids(2), omega=1.0, mask_token_id=MASK_ID, max_new_tokens=4,
                                grad_every=None, batch_size=1, progress=False)
    assert all(len(r["self_prompt_share"]) == 4 for r in records)


def test_bad_arguments_raise():
    model = eager_model("llama")
    prompts, masks = random_prompts([6, 9])
    with pytest.raises(ValueError, match="unique"):
        measure_attention(model, prompts, masks, ["a", "a"], omega=1.0, mask_token_id=MASK_ID, progress=False)
    with pytest.raises(ValueError, match="self_every"):
        measure_attention(model, prompts, masks, ["a", "b"], omega=1.0, mask_token_id=MASK_ID, self_every=0, progress=False)
    with pytest.raises(ValueError, match="grad_task_ids"):
        measure_attention(model, prompts, masks, ["a", "b"], omega=1.0, mask_token_id=MASK_ID, grad_task_ids=["c"], progress=False)


@pytest.mark.parametrize("masking", ["replace", "delete"])
def test_text_level_masking_is_refused(masking):
    """The shares are measured over the prompt's own tokens; a re-tokenized masked view has other ones."""
    model = eager_model("llama")
    prompts, masks = random_prompts([6, 9])
    with pytest.raises(ConfigError, match=f"masking='{masking}'.*'token' or 'attention'"):
        measure_attention(model, prompts, masks, task_ids(2), omega=1.5, mask_token_id=MASK_ID, masking=masking, progress=False)
    with pytest.raises(ConfigError, match=f"masking='{masking}'"):
        gradient_prompt_shares(model, prompts[0], masks[0], [1, 2], [0, 1], omega=1.5, mask_token_id=MASK_ID, masking=masking)


def top100_reference(model, prompt: list[int], generated: list[int], steps: list[int]) -> list[float]:
    """The authors' gradient attention by hand: one unpadded forward of the original view per step, the
    gradient of the sum of its 100 largest last-position logits w.r.t. the input embeddings."""
    shares = []
    for t in steps:
        embeds = model.get_input_embeddings()(torch.tensor([prompt + generated[:t]])).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0, -1]
        logits.topk(100).values.sum().backward()
        norms = embeds.grad[0].norm(dim=-1)
        shares.append(float(norms[: len(prompt)].sum() / norms.sum()))
    return shares


@pytest.mark.parametrize("architecture", ["llama", "codegen"])
def test_top100_gradient_and_a_shorter_masked_view(architecture):
    """protocol=authors' attention: SPA decoded with a re-tokenized (shorter) masked view, self-attention
    from the original view, gradient of the original view's top-100 logit sum."""
    model = make_tiny_model(architecture, vocab_size=160, dtype=DTYPE)
    model.set_attn_implementation("eager")
    prompts, masks = random_prompts([12, 9, 15], seed=7)
    masked = [[t for t, a in zip(p, m) if not a][:3] + [MASK_ID] + [t for t, a in zip(p, m) if not a][3:] for p, m in zip(prompts, masks)]
    assert all(len(v) < len(p) for v, p in zip(masked, prompts))
    records = measure_attention(model, prompts, masks, task_ids(3), omega=1.8, mask_token_id=MASK_ID, max_new_tokens=9,
                                masked_prompts=masked, gradient_target="top100_logit_sum", grad_every=4, batch_size=3,
                                progress=False)
    generated = spa.decode(model, prompts, masked_prompts=masked, omega=1.8, max_new_tokens=9)
    assert generated != spa.decode(model, prompts, omega=1.0, masked_prompts=masked, max_new_tokens=9), "SPA changes tokens"
    for record, prompt, ids in zip(records, prompts, generated):
        assert_valid(record)
        assert record["n_generated"] == len(ids) == 9
        assert record["self_prompt_share"] == pytest.approx(full_forward_shares(model, prompt, ids, record["self_steps"]), abs=TOLERANCE)
        assert record["grad_steps"] == [0, 4, 8]
        assert record["grad_prompt_share"] == pytest.approx(top100_reference(model, prompt, ids, [0, 4, 8]), abs=1e-5)


def test_combined_logit_gradient_needs_same_length_views():
    model = eager_model("llama")
    prompts, masks = random_prompts([6, 9])
    with pytest.raises(ConfigError, match="top100_logit_sum"):
        measure_attention(model, prompts, masks, task_ids(2), omega=1.5, mask_token_id=MASK_ID,
                          masked_prompts=[p[:3] for p in prompts], progress=False)
    with pytest.raises(ConfigError, match="Unknown gradient target"):
        gradient_prompt_shares(model, prompts[0], masks[0], [1, 2], [0], omega=1.5, mask_token_id=MASK_ID, gradient_target="max")
