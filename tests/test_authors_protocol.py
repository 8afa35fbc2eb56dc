"""protocol=authors against golden fixtures made by running the authors' own functions under transformers 4.38.1.

The fixtures (tests/fixtures/authors/, made by make_fixtures.py there) hold, for every HumanEval and MBPP
task of the authors' files, each model family and each anchor condition, the masked prompt their driver built
and the sha256 of the original and masked ids their ``prompt_to_inputs`` returned; and transcripts of their
decode loop played back token by token. Our protocol runs under transformers 5 and must give the same.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import spa
from eval.benchmarks import authors
from eval.benchmarks.protocols import ProtocolSettings, make_protocol
from eval.errors import ConfigError
from spa.masking import replace_spans
from tests.conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "authors"
FAMILIES = ("deepseek", "codellama", "codegen")
BENCHMARKS = ("humaneval", "mbpp")


def id_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


@pytest.fixture(scope="module")
def golden_inputs() -> dict:
    with gzip.open(FIXTURES / "inputs.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def authors_settings() -> ProtocolSettings:
    return ProtocolSettings.from_config(yaml.safe_load((REPO_ROOT / "configs" / "protocol" / "authors.yaml").read_text()))


@pytest.fixture(scope="module")
def protocol_of(golden_inputs, authors_settings, data_dir):
    made = {}

    def protocol(family: str):
        if family not in made:
            folder = golden_inputs["families"][family]["tokenizer_dir"]
            tokenizer = spa.load_tokenizer(str(data_dir / "tokenizers" / folder))
            made[family] = make_protocol(
                authors_settings, {"name": family, "family": family}, tokenizer, masking=None, max_new_tokens=512,
                data_dir=data_dir, authors_data_dir=data_dir.parent / "reference" / "spa-authors" / "dataset",
            )
        return made[family]

    return protocol


@pytest.mark.parametrize("benchmark", BENCHMARKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_inputs_equal_the_authors_for_every_task(golden_inputs, protocol_of, family, benchmark):
    """Original and masked ids, and the masked prompt text, of every task and condition."""
    protocol = protocol_of(family)
    tasks = protocol.tasks(benchmark)
    records = golden_inputs["records"][family][benchmark]
    assert sorted(records) == sorted(tasks)
    mask = golden_inputs["families"][family]["mask_string"]
    mismatches = []
    for task_id, record in records.items():
        for condition, golden in record["conditions"].items():
            inputs = protocol.model_inputs(tasks[task_id], benchmark, condition)
            spans = authors.anchored_spans(benchmark, condition, tasks[task_id]["prompt"], tasks[task_id]["task_sentence"]).spans
            got = {
                "orig": (len(inputs.input_ids), id_hash(inputs.input_ids)),
                "masked": (len(inputs.masked_input_ids), id_hash(inputs.masked_input_ids)),
                "text": replace_spans(tasks[task_id]["prompt"], spans, mask),
            }
            want = {
                "orig": (record["orig_len"], record["orig_sha256"]),
                "masked": (golden["masked_len"], golden["masked_sha256"]),
                "text": golden["masked_prompt"],
            }
            mismatches += [(task_id, condition, key) for key in want if got[key] != want[key]]
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_ids_of_selected_tasks(golden_inputs, protocol_of, family):
    """Id for id on the tasks the fixture keeps whole (BOS, the mask id, the ids after it)."""
    protocol = protocol_of(family)
    for benchmark, by_task in golden_inputs["full_ids"][family].items():
        tasks = protocol.tasks(benchmark)
        for task_id, golden in by_task.items():
            for condition, masked in golden["masked"].items():
                inputs = protocol.model_inputs(tasks[task_id], benchmark, condition)
                assert inputs.input_ids == golden["orig"], (task_id, condition)
                assert inputs.masked_input_ids == masked, (task_id, condition)


def test_quirk_counts(protocol_of):
    """The documented quirks (docs/deviations.md) touch exactly the tasks they are said to."""
    protocol = protocol_of("codegen")
    humaneval, mbpp = protocol.tasks("humaneval"), protocol.tasks("mbpp")
    single_quotes = [t for t, task in humaneval.items() if authors.anchored_spans("humaneval", "nl", task["prompt"]).quirks]
    assert len(single_quotes) == 17
    unmasked = [t for t, task in mbpp.items() if not authors.anchored_spans("mbpp", "nl", task["prompt"], task["task_sentence"]).spans]
    assert unmasked == ["Mbpp/752", "Mbpp/753"]
    assert len(humaneval) == 164 and len(mbpp) == 399


def test_deepseek_prompt_shape(protocol_of):
    """Their instruction around the stripped prompt, the template's system prompt, no prefilled answer."""
    protocol = protocol_of("deepseek")
    task = protocol.tasks("humaneval")["HumanEval/0"]
    inputs = protocol.model_inputs(task, "humaneval", "nl")
    assert inputs.prompt_text.startswith("<｜begin▁of▁sentence｜>You are an AI programming assistant")
    assert "Please continue to complete the function." in inputs.prompt_text
    assert f"```python\n{task['prompt'].strip()}\n```\n" in inputs.prompt_text
    assert inputs.prompt_text.endswith("### Response:\n")
    assert inputs.input_ids[0] == 32013 and inputs.input_ids.count(32013) == 1
    assert inputs.masked_input_ids.count(32018) == 1  # '<pad>', an added non-special token
    assert inputs.anchored_text == ["Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold."]
    mbpp = protocol.tasks("mbpp")["Mbpp/2"]
    assert f"### Instruction:\n{mbpp['prompt']}\n" in protocol.model_inputs(mbpp, "mbpp", "nl").prompt_text


def test_total_length_budget(protocol_of, authors_settings):
    protocol = protocol_of("codellama")
    task = protocol.tasks("humaneval")["HumanEval/0"]
    inputs = protocol.model_inputs(task, "humaneval", "nl")
    assert inputs.max_new_tokens == authors_settings.max_length - len(inputs.input_ids) == 500 - 134
    assert protocol.budget(600) == 0


def test_conditions_the_authors_never_ran_are_refused(protocol_of):
    protocol = protocol_of("codegen")
    task = protocol.tasks("humaneval")["HumanEval/0"]
    with pytest.raises(ConfigError, match="protocol=evalplus"):
        protocol.model_inputs(task, "humaneval", "nl+code")


def test_model_without_family_is_refused(authors_settings, data_dir):
    with pytest.raises(ConfigError, match="family"):
        make_protocol(authors_settings, {"name": "mystery"}, None, masking=None, max_new_tokens=8, data_dir=data_dir,
                      authors_data_dir=Path("."))


@pytest.fixture(scope="module")
def transcripts() -> list[dict]:
    return json.loads((FIXTURES / "transcripts.json").read_text(encoding="utf-8"))["cases"]


def play(protocol, inputs, scripted: list[int]) -> list[int]:
    """What spa.decode returns under the protocol's stop rule when the model's choices are ``scripted``."""
    stop_rule = protocol.decode_options([inputs])["stop_rule"]
    chosen = []
    for token in scripted[: inputs.max_new_tokens]:
        chosen.append(token)
        if stop_rule(0, 0, token):
            break
    return chosen


def test_stops_and_extraction_equal_the_authors_decode_loop(transcripts, protocol_of, authors_settings):
    """Their augmented_generate_anchor, played back token by token: tokens consumed and the program saved."""
    assert len(transcripts) >= 50
    failures = []
    for case in transcripts:
        base = protocol_of(case["family"])
        protocol = make_protocol(
            replace(authors_settings, max_length=case["max_length"]), base.model_cfg, base.tokenizer, masking=None,
            max_new_tokens=10_000, data_dir=base.data_dir, authors_data_dir=base.authors_data_dir,
        )
        task = protocol.tasks(case["benchmark"])[case["task_id"]]
        inputs = protocol.model_inputs(task, case["benchmark"], case["condition"])
        assert (len(inputs.input_ids), len(inputs.masked_input_ids)) == (case["prompt_len"], case["masked_len"]), case["kind"]
        chosen = play(protocol, inputs, case["scripted_ids"])
        record = protocol.solution(task, inputs, chosen, protocol.eos_ids(None))
        if (len(chosen), record["raw_solution"]) != (case["n_chosen"], case["entire_code"]):
            failures.append((case["family"], case["benchmark"], case["kind"], len(chosen), case["n_chosen"]))
    assert not failures, failures


def test_cases_cover_every_way_generation_ends(transcripts):
    """The comparison above is only as good as its cases: each family meets each of its stops."""
    ends = {(c["family"], c["ended_by"]) for c in transcripts}
    for family in FAMILIES:
        assert {(family, "eos"), (family, "stop_condition"), (family, "budget"), (family, "no_step")} <= ends
    assert ("deepseek", "bos_rule") in ends


def test_codegen_decodes_with_4_38_cleanup(protocol_of):
    """4.38's CodeGen decode cleaned up tokenization spaces; the authors' stops saw that text."""
    tokenizer = protocol_of("codegen").tokenizer
    ids = tokenizer("x = ' '.join(words) if a != b else c", add_special_tokens=False)["input_ids"]
    assert authors.decode(tokenizer, "codegen", ids) == "x =''.join(words) if a!= b else c"
    assert authors.decode(tokenizer, "deepseek", ids) == "x = ' '.join(words) if a != b else c"


def test_decoding_equals_4_38(protocol_of):
    """Whole sequences (prompt + realistic generations) decode to what 4.38 decoded."""
    golden = json.loads((FIXTURES / "decode.json").read_text(encoding="utf-8"))["sequences"]
    failures, n = [], 0
    for family, sequences in golden.items():
        tokenizer = protocol_of(family).tokenizer
        for index, sequence in enumerate(sequences):
            n += 1
            if authors.decode(tokenizer, family, sequence["ids"]) != sequence["decode"]:
                failures.append((family, index))
    assert n >= 12 and not failures, failures
