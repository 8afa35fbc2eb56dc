"""SPALogitsProcessor inside model.generate: left-padded batches, several return sequences, no leaks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import spa
from spa.hf import SPALogitsProcessor
from spa.views import build_views
from tests.conftest import make_tiny_model

PROMPTS = [
    "def <anchor>sort the list in place</anchor>(xs):\n",
    "# <anchor>return the sum</anchor>\ndef total(values):",
    "x = 1",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir("codellama-7b"))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return make_tiny_model(request.param, vocab_size=32016)


@pytest.mark.parametrize("masking", ["token", "attention"])
def test_generate_with_processor_equals_engine_on_padded_batch(model, tokenizer, masking):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5, masking=masking)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded for this test to mean anything"
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.unk_token_id)
    width = inputs["input_ids"].shape[1]
    anchored = [spa.anchor_prompt(tokenizer, p) for p in PROMPTS]
    expected = spa.decode(model, [a.input_ids for a in anchored], [a.anchor_mask for a in anchored], omega=1.5,
                          mask_token_id=spa.resolve_mask_token_id(tokenizer), max_new_tokens=12, masking=masking)
    assert out[:, width:].tolist() == expected


def test_processor_state_does_not_leak_between_calls(model, tokenizer):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5)
    kwargs = dict(logits_processor=[processor], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(**inputs, **kwargs)
        # A shorter call in between would corrupt a processor that keeps its cache across calls.
        model.generate(**{k: v[:, :] for k, v in inputs.items()}, logits_processor=[processor], max_new_tokens=3,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
        again = model.generate(**inputs, **kwargs)
    assert torch.equal(first, again)


def test_several_return_sequences(model, tokenizer):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=6, do_sample=True,
                             num_return_sequences=3, eos_token_id=None, pad_token_id=0)
    assert out.shape[0] == 9
    greedy_inputs, greedy_processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.3)
    with torch.no_grad():
        # top_k=1 sampling is greedy; generate refuses several greedy return sequences.
        greedy = model.generate(**greedy_inputs, logits_processor=[greedy_processor], max_new_tokens=6, do_sample=True,
                                top_k=1, num_return_sequences=2, eos_token_id=None, pad_token_id=0)
    width = inputs["input_ids"].shape[1]
    anchored = [spa.anchor_prompt(tokenizer, p) for p in PROMPTS]
    expected = spa.decode(model, [a.input_ids for a in anchored], [a.anchor_mask for a in anchored], omega=1.3,
                          mask_token_id=spa.resolve_mask_token_id(tokenizer), max_new_tokens=6, num_samples=2)
    assert greedy[:, width:].tolist() == expected


def test_mismatched_inputs_are_a_clear_error(model, tokenizer):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5)
    with pytest.raises(ValueError, match="built for"):
        model.generate(input_ids=inputs["input_ids"][:, 1:], attention_mask=inputs["attention_mask"][:, 1:],
                       logits_processor=[processor], max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("masking", ["replace", "delete"])
def test_processor_with_a_masked_view_of_another_length_equals_engine(model, tokenizer, masking):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5, masking=masking)
    anchored = [spa.anchor_prompt(tokenizer, p) for p in PROMPTS]
    masked = [spa.masked_view(tokenizer, a.text, a.anchor_spans, masking) for a in anchored]
    assert [len(m) for m in masked] != [len(a.input_ids) for a in anchored], "the masked view must change length"
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.unk_token_id)
    expected = spa.decode(model, [a.input_ids for a in anchored], omega=1.5, masked_prompts=masked, max_new_tokens=12)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == expected


def test_processor_from_explicit_masked_ids_and_their_own_padding(model, tokenizer):
    anchored = [spa.anchor_prompt(tokenizer, p) for p in PROMPTS]
    # Masked views wider and narrower than the prompts, padded on their own.
    masked = [a.input_ids[:2] + a.input_ids[-1:] for a in anchored[:2]] + [anchored[2].input_ids * 3]
    inputs, prepared = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.4, masked_prompts=masked)
    batch = build_views(masked, views=("original",), pad_id=0)
    assert batch.input_ids.shape[1] != inputs["input_ids"].shape[1]
    direct = SPALogitsProcessor(model, masked_input_ids=batch.input_ids, masked_attention_mask=batch.attention_mask, omega=1.4)
    expected = spa.decode(model, [a.input_ids for a in anchored], omega=1.4, masked_prompts=masked, max_new_tokens=10)
    for processor in (prepared, direct):
        with torch.no_grad():
            out = model.generate(**inputs, logits_processor=[processor], max_new_tokens=10, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert out[:, inputs["input_ids"].shape[1]:].tolist() == expected


def test_processor_masked_view_arguments_are_checked(model, tokenizer):
    inputs, processor = SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5)
    with pytest.raises(ValueError, match="exactly one way"):
        SPALogitsProcessor(model, processor.masked_input_ids, inputs["attention_mask"], 1.5,
                           masked_attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="exactly one way"):
        SPALogitsProcessor(model, processor.masked_input_ids, omega=1.5)
    with pytest.raises(ValueError, match="masking='replace'"):
        SPALogitsProcessor.prepare(model, tokenizer, PROMPTS, omega=1.5, masking="replace", masked_prompts=[[1]] * 3)
    # The constructor's old positional form still works.
    old = SPALogitsProcessor(model, processor.masked_input_ids, inputs["attention_mask"], 1.5)
    with torch.no_grad():
        kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(model.generate(**inputs, logits_processor=[old], **kwargs),
                           model.generate(**inputs, logits_processor=[processor], **kwargs))
