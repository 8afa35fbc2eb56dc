"""Anchors -> tokens on the real tokenizers of the paper's models, BOS handling, mask tokens, text generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import spa
from eval.benchmarks.data import load_tasks
from eval.errors import ConfigError
from spa.text import anchor_prompt, merge_spans, resolve_add_bos, truncate_at_stop

SENTENCE = "Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold."
# Golden anchor token ranges of HumanEval/0's docstring sentence, from ../shared/data/tokenizers/SOURCES.md
# (inclusive; DeepSeek-Coder with the BOS its model expects, i.e. the transformers 4.x indices).
GOLDEN = {
    "deepseek-coder-instruct": (33, 54, True),
    "codellama-7b": (31, 52, True),
    "codegen-350m-mono": (31, 52, False),
    "qwen2.5-coder-instruct": (23, 44, False),
}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    return {name: AutoTokenizer.from_pretrained(tokenizer_dir(name)) for name in GOLDEN}


@pytest.fixture(scope="module")
def humaneval0(data_dir):
    prompt = load_tasks("humaneval", data_dir)["HumanEval/0"]["prompt"]
    start = prompt.index(SENTENCE)
    return prompt, (start, start + len(SENTENCE))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_anchor_token_ranges(tokenizers, humaneval0, name):
    tokenizer = tokenizers[name]
    prompt, span = humaneval0
    first, last, has_bos = GOLDEN[name]
    anchored = anchor_prompt(tokenizer, prompt, [span])
    indices = [i for i, a in enumerate(anchored.anchor_mask) if a]
    assert (indices[0], indices[-1]) == (first, last)
    assert indices == list(range(first, last + 1)), "the anchor must be a contiguous token range"
    assert (anchored.input_ids[0] == tokenizer.bos_token_id) == has_bos
    assert tokenizer.decode(anchored.input_ids, skip_special_tokens=True) == prompt


def test_deepseek_bos_is_explicit(tokenizers, humaneval0):
    """transformers 5 no longer adds DeepSeek-Coder's BOS on encode; the harness must, exactly once."""
    tokenizer = tokenizers["deepseek-coder-instruct"]
    prompt, span = humaneval0
    assert resolve_add_bos(tokenizer) is True
    with_bos = anchor_prompt(tokenizer, prompt, [span])
    without = anchor_prompt(tokenizer, prompt, [span], add_bos=False)
    assert with_bos.input_ids[0] == 32013 and without.input_ids[0] != 32013
    assert with_bos.input_ids[1:] == without.input_ids
    chat = anchor_prompt(tokenizer, [{"role": "user", "content": prompt}])
    assert chat.input_ids[0] == 32013 and chat.input_ids[1] != 32013, "the chat template prints BOS; never twice"


def test_four_anchor_formats_agree(tokenizers, humaneval0):
    tokenizer = tokenizers["codegen-350m-mono"]
    prompt, (start, end) = humaneval0
    by_span = anchor_prompt(tokenizer, prompt, [(start, end)])
    by_substring = anchor_prompt(tokenizer, prompt, [SENTENCE])
    by_tag = anchor_prompt(tokenizer, prompt[:start] + "<anchor>" + SENTENCE + "</anchor>" + prompt[end:])
    for other in (by_substring, by_tag):
        assert other.input_ids == by_span.input_ids
        assert other.anchor_mask == by_span.anchor_mask
        assert other.anchored_text == [SENTENCE]


def test_chat_messages_with_per_message_anchors(tokenizers, humaneval0):
    tokenizer = tokenizers["deepseek-coder-instruct"]
    prompt, _ = humaneval0
    messages = [{"role": "user", "content": "Complete the function.\n" + prompt, "anchors": [SENTENCE]}]
    anchored = anchor_prompt(tokenizer, messages)
    assert anchored.text.startswith("<｜begin▁of▁sentence｜>You are an AI programming assistant")
    assert anchored.text.endswith("### Response:\n")
    assert anchored.anchored_text == [SENTENCE]
    tokens = [tokenizer.decode([i]) for i, a in zip(anchored.input_ids, anchored.anchor_mask) if a]
    assert "".join(tokens).strip() == SENTENCE.strip()
    tagged = anchor_prompt(tokenizer, [{"role": "user", "content": "Complete the function.\n" + prompt.replace(SENTENCE, f"<anchor>{SENTENCE}</anchor>")}])
    assert tagged.anchor_mask == anchored.anchor_mask


def test_qwen_chat_template(tokenizers):
    tokenizer = tokenizers["qwen2.5-coder-instruct"]
    anchored = anchor_prompt(tokenizer, [{"role": "user", "content": "Write <anchor>a sorting function</anchor> now."}])
    assert "<|im_start|>user" in anchored.text and anchored.text.rstrip().endswith("<|im_start|>assistant")
    assert anchored.anchored_text == ["a sorting function"]
    assert [tokenizer.decode([i]) for i, a in zip(anchored.input_ids, anchored.anchor_mask) if a] == [" a", " sorting", " function"]


def test_token_anchored_iff_it_overlaps_a_span(tokenizers):
    tokenizer = tokenizers["codellama-7b"]
    text = "def add(a, b):\n    return a + b"
    anchored = anchor_prompt(tokenizer, text, [(4, 5)])  # one character inside "add"
    marked = [tokenizer.convert_ids_to_tokens(i) for i, a in zip(anchored.input_ids, anchored.anchor_mask) if a]
    assert marked == ["▁add"]
    for (s, e), a in zip(anchored.offsets, anchored.anchor_mask):
        assert a == (s < 5 and 4 < e)


def test_bad_anchors_are_clear_errors(tokenizers):
    tokenizer = tokenizers["codegen-350m-mono"]
    with pytest.raises(ConfigError, match="does not occur"):
        anchor_prompt(tokenizer, "def f(): pass", ["missing text"])
    with pytest.raises(ConfigError, match="outside the prompt"):
        anchor_prompt(tokenizer, "def f(): pass", [(3, 99)])
    with pytest.raises(ConfigError, match="Unbalanced"):
        anchor_prompt(tokenizer, "def <anchor>f(): pass")
    with pytest.raises(ConfigError, match="no chat"):
        anchor_prompt(tokenizer, [{"role": "user", "content": "hi"}])


def test_mask_token_resolution(tokenizers):
    # auto: DeepSeek-Coder's declared pad token <｜end▁of▁sentence｜>; the authors named the added "<pad>" (32018).
    assert spa.resolve_mask_token_id(tokenizers["deepseek-coder-instruct"]) == 32014
    assert spa.resolve_mask_token_id(tokenizers["deepseek-coder-instruct"], "<pad>") == 32018
    assert spa.resolve_mask_token_id(tokenizers["codellama-7b"]) == 0  # <unk>, as the authors
    assert spa.resolve_mask_token_id(tokenizers["codegen-350m-mono"], " ") == 220  # a space, as the authors
    assert spa.resolve_mask_token_id(tokenizers["codellama-7b"], "<unk>") == 0
    assert spa.resolve_mask_token_id(tokenizers["codellama-7b"], 5) == 5
    with pytest.raises(ConfigError, match="exactly one"):
        spa.resolve_mask_token_id(tokenizers["codegen-350m-mono"], "two words")
    with pytest.raises(ConfigError, match="outside"):
        spa.resolve_mask_token_id(tokenizers["codegen-350m-mono"], 10**6)


def test_mask_token_missing_is_a_clear_error(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("codegen-350m-mono"))
    tokenizer.unk_token = None
    with pytest.raises(ConfigError, match="no mask, unk or pad token"):
        spa.resolve_mask_token_id(tokenizer)


def test_merge_and_truncate_helpers():
    assert merge_spans([(5, 9), (0, 2), (8, 12), (2, 3), (4, 4)]) == ((0, 3), (5, 12))
    assert truncate_at_stop("a\nb\ndef g", ["\ndef", "\nclass"]) == "a\nb"
    assert truncate_at_stop("abc", ["x"]) == "abc"


def test_generate_text_with_stop_strings(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("deepseek-coder-instruct"))
    model = spa.load_model(str(spa.build_tiny_model(tmp_path / "tiny", tokenizer_dir("deepseek-coder-instruct"))), dtype="fp32")
    prompts = ["def <anchor>sort the list</anchor>(xs):\n", "Write <anchor>fast</anchor> code:"]
    full = spa.generate(model, tokenizer, prompts, omega=1.3, max_new_tokens=24, eos_token_id=[])
    assert len(full) == 2 and all(isinstance(t, str) and t for t in full)
    # Stop at the text of the 3rd..4th characters of the first completion: the output must end right before it.
    stop = full[0][3:5]
    cut = spa.generate(model, tokenizer, prompts, omega=1.3, max_new_tokens=24, eos_token_id=[], stop_strings=[stop])
    assert cut[0] == full[0][: full[0].find(stop)]
    assert stop not in cut[0]


@pytest.mark.parametrize("name,mask_string", [("codellama-7b", "<unk>"), ("deepseek-coder-instruct", "<｜end▁of▁sentence｜>")])
def test_masked_view_replace_and_delete_tokenize_the_rewritten_text(tokenizers, humaneval0, name, mask_string):
    tokenizer = tokenizers[name]
    prompt, (start, end) = humaneval0
    bos = [tokenizer.bos_token_id]  # both models expect BOS (see GOLDEN)

    def encode(text):
        return bos + tokenizer(text, add_special_tokens=False)["input_ids"]

    replaced = spa.masked_view(tokenizer, prompt, [(start, end)], "replace")
    assert replaced == encode(prompt[:start] + mask_string + prompt[end:])
    assert replaced.count(spa.resolve_mask_token_id(tokenizer)) == 1, "the whole span becomes ONE mask token"
    assert spa.masked_view(tokenizer, prompt, [(start, end)], "replace", mask_token="MASK") == encode(prompt[:start] + "MASK" + prompt[end:])
    deleted = spa.masked_view(tokenizer, prompt, [(start, end)], "delete")
    assert deleted == encode(prompt[:start] + prompt[end:])
    original = anchor_prompt(tokenizer, prompt, [(start, end)])
    assert len(deleted) < len(replaced) < len(original.input_ids)
    # Several spans, touching ones merged into one: each anchored stretch becomes one mask string.
    spans = [(start, start + 10), (start + 10, start + 20), (end - 5, end)]
    assert spa.masked_view(tokenizer, prompt, spans, "replace") == encode(
        prompt[:start] + mask_string + prompt[start + 20 : end - 5] + mask_string + prompt[end:]
    )
    # token / attention keep the prompt's length.
    token = spa.masked_view(tokenizer, prompt, [(start, end)], "token")
    assert token == spa.masked_prompt_ids(original.input_ids, original.anchor_mask, spa.resolve_mask_token_id(tokenizer))
    assert spa.masked_view(tokenizer, prompt, [(start, end)], "attention") == original.input_ids
    with pytest.raises(ConfigError, match="Unknown SPA masking"):
        spa.masked_view(tokenizer, prompt, [(start, end)], "blank")


def test_generate_with_text_level_masking_equals_decode_of_the_masked_view(tokenizers):
    from tests.conftest import make_tiny_model

    tokenizer = tokenizers["codellama-7b"]
    model = make_tiny_model("llama", vocab_size=32016, dtype=torch.float32)
    prompts = ["def <anchor>sort the list in place</anchor>(xs):\n", "# <anchor>return the sum</anchor>\ndef total(values):"]
    anchored = [anchor_prompt(tokenizer, p) for p in prompts]
    for masking in ("replace", "delete"):
        texts = spa.generate(model, tokenizer, prompts, omega=1.5, max_new_tokens=[10, 6], eos_token_id=[], masking=masking)
        masked = [spa.masked_view(tokenizer, a.text, a.anchor_spans, masking) for a in anchored]
        ids = spa.decode(model, [a.input_ids for a in anchored], omega=1.5, masked_prompts=masked, max_new_tokens=[10, 6])
        assert texts == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        assert [len(i) for i in ids] == [10, 6]


def test_a_bare_string_instead_of_a_list_of_prompts_is_refused(tokenizers):
    tokenizer = tokenizers["codellama-7b"]
    with pytest.raises(ConfigError, match=r"prompts is a single string.*list of prompts.*prompts=\[prompt\]"):
        spa.generate(None, tokenizer, "def f(xs):\n    return sorted(xs)", omega=1.3, max_new_tokens=8)
    with pytest.raises(ConfigError, match="one chat conversation"):
        spa.generate(None, tokenizer, [{"role": "user", "content": "Sort a list."}], omega=1.3, max_new_tokens=8)
    with pytest.raises(ConfigError, match="list of prompts"):
        spa.SPALogitsProcessor.prepare(None, tokenizer, "def f(xs):", omega=1.3)


def test_a_flat_anchor_list_for_one_prompt_is_refused(tokenizers):
    tokenizer = tokenizers["codellama-7b"]
    prompt = "def order(xs):\n    return sorted(xs)"
    for flat in (["order"], "order", [(4, 9)], (4, 9)):
        with pytest.raises(ConfigError, match=r"one anchor list per prompt.*anchors=\[\['text to anchor'\]\]"):
            spa.generate(None, tokenizer, [prompt], flat, omega=1.3, max_new_tokens=8)
    with pytest.raises(ConfigError, match="2 entries for 1 prompts"):
        spa.generate(None, tokenizer, [prompt], [["order"], ["xs"]], omega=1.3, max_new_tokens=8)
    # The right shapes pass: one list per prompt.
    assert spa.text.anchor_prompts(tokenizer, [prompt], [["order"]])[0].anchored_text == ["order"]
    assert spa.text.anchor_prompts(tokenizer, [prompt], [[(4, 9)]])[0].anchored_text == ["order"]


def test_resaved_tokenizer_keeps_its_bos_with_a_warning(tokenizer_dir, tmp_path):
    """transformers 5's save_pretrained drops add_bos_token: DeepSeek-Coder must not silently lose its BOS."""
    tokenizer = spa.load_tokenizer(str(tokenizer_dir("deepseek-coder-instruct")))
    tokenizer.save_pretrained(tmp_path)
    resaved = spa.load_tokenizer(str(tmp_path))
    assert spa.resolve_add_bos(tokenizer) is True
    with pytest.warns(UserWarning, match="save_pretrained drops it"):
        assert spa.resolve_add_bos(resaved) is True
    assert spa.resolve_add_bos(resaved, add_bos=False) is False
    codegen = spa.load_tokenizer(str(tokenizer_dir("codegen-350m-mono")))
    assert spa.resolve_add_bos(codegen) is False
