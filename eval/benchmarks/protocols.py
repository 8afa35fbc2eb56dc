"""Protocols: everything that decides what a model sees for a task and how its answer becomes a program.

A protocol owns the dataset releases (prompts and tests), the prompt rendering, which characters each anchor
condition covers, the mask string and masking strategy, the length budget, the stop rules and the
post-processing (``configs/protocol/*.yaml``; README "Protocols"):

* ``evalplus`` (:class:`EvalPlusProtocol`): EvalPlus 0.3.1's prompts, stop strings and sanitizer on the newest
  releases, the harness's typed spans (``eval.benchmarks.spans``) and the paper's same-position masking.
* ``authors`` (:class:`AuthorsProtocol`): what the paper authors' research code did (``eval.benchmarks.authors``).

Both produce :class:`ModelInputs`: the exact ids of both views, which the runner hands to ``spa.decode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import StopStringCriteria

import spa
from eval.benchmarks import authors
from spa.masking import MASKING_VARIANTS, TEXT_MASKING, mask_string, replace_spans
from spa.text import anchor_mask_of
from eval.benchmarks.data import benchmark_spec, load_authors_tasks, load_tasks
from eval.benchmarks.postprocess import sanitized_solution, to_solution
from eval.benchmarks.prompts import BuiltPrompt, build_prompt
from eval.benchmarks.spans import validate_condition
from eval.errors import ConfigError

PROTOCOLS: tuple[str, ...] = ("evalplus", "authors")
LENGTH_BUDGETS: tuple[str, ...] = ("new", "total")


@dataclass(frozen=True)
class ProtocolSettings:
    """The typed ``protocol`` config group."""

    name: str
    datasets: dict[str, str]  # benchmark -> EvalPlus release whose tests judge the samples
    masking: str  # default masking strategy (spa.masking overrides it)
    length_budget: str  # "new": generation.max_new_tokens; "total": max_length counts the prompt too
    max_length: int | None
    attention_gradient: str  # what the gradient attention differentiates (spa.attention)
    mask_strings: dict[str, str] = field(default_factory=dict)  # family -> mask string (authors)
    sanitize: bool = True  # pass the program through EvalPlus's sanitizer (with the harness's fallback)

    @classmethod
    def from_config(cls, config: dict) -> "ProtocolSettings":
        config = dict(config)
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown protocol setting(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}.")
        settings = cls(**config)
        if settings.name not in PROTOCOLS:
            raise ConfigError(f"Unknown protocol {settings.name!r}; use one of {', '.join(PROTOCOLS)} (configs/protocol/).")
        if settings.length_budget not in LENGTH_BUDGETS or (settings.length_budget == "total" and not settings.max_length):
            raise ConfigError(
                f"protocol.length_budget={settings.length_budget!r} with max_length={settings.max_length!r}: use 'new' "
                "(generation.max_new_tokens new tokens) or 'total' with a positive protocol.max_length (prompt + new tokens)."
            )
        if settings.masking not in MASKING_VARIANTS:
            raise ConfigError(f"Unknown masking {settings.masking!r}; use one of {', '.join(MASKING_VARIANTS)}.")
        return settings


@dataclass(frozen=True)
class ModelInputs:
    """What the model receives for one task: both views' exact ids (BOS included) and the text behind them."""

    task_id: str
    benchmark: str
    condition: str
    prompt_text: str
    anchor_spans: tuple[tuple[int, int], ...]  # character spans of prompt_text
    input_ids: list[int]
    anchor_mask: list[bool]  # per original id: it overlaps an anchored span
    masking: str
    masked_prompt_text: str
    masked_input_ids: list[int]
    max_new_tokens: int
    quirks: tuple[str, ...] = ()  # the authors' quirks that applied to this task
    built: BuiltPrompt | None = None  # protocol=evalplus's rendered prompt (post-processing needs it)

    @property
    def anchored_text(self) -> list[str]:
        return [self.prompt_text[start:end] for start, end in self.anchor_spans]


class Protocol:
    """Common machinery; subclasses render, tokenize, stop and post-process."""

    def __init__(self, settings: ProtocolSettings, model_cfg: dict, tokenizer, *, masking: str | None,
                 max_new_tokens: int, data_dir: Path | None, authors_data_dir: Path | None):
        self.settings = settings
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.masking = masking or settings.masking
        if self.masking not in MASKING_VARIANTS:
            raise ConfigError(f"Unknown masking {self.masking!r}; use one of {', '.join(MASKING_VARIANTS)}.")
        self.max_new_tokens = int(max_new_tokens)
        self.data_dir = data_dir
        self.authors_data_dir = authors_data_dir

    @property
    def name(self) -> str:
        return self.settings.name

    def dataset_version(self, benchmark: str) -> str:
        return benchmark_spec(benchmark, self.settings.datasets.get(benchmark)).version

    def test_tasks(self, benchmark: str) -> dict[str, dict]:
        """The EvalPlus tasks whose tests judge this protocol's samples."""
        return load_tasks(benchmark, self.data_dir, self.dataset_version(benchmark))

    def budget(self, n_prompt_ids: int) -> int:
        if self.settings.length_budget == "total":
            return max(0, min(self.max_new_tokens, int(self.settings.max_length) - n_prompt_ids))
        return self.max_new_tokens

    # -- to override
    def tasks(self, benchmark: str) -> dict[str, dict]:
        raise NotImplementedError

    def validate_condition(self, benchmark: str, condition: str) -> str:
        raise NotImplementedError

    def mask_string(self) -> str | int | None:
        raise NotImplementedError

    def render(self, task: dict, benchmark: str, condition: str) -> tuple[str, tuple[tuple[int, int], ...], tuple[str, ...], BuiltPrompt | None]:
        raise NotImplementedError

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    # -- shared
    def model_inputs(self, task: dict, benchmark: str, condition: str) -> ModelInputs:
        self.validate_condition(benchmark, condition)
        text, spans, quirks, built = self.render(task, benchmark, condition)
        spans = tuple(sorted(spans))
        ids, offsets = self.tokenize(text)
        anchor_mask = anchor_mask_of(offsets, spans)
        if self.masking in TEXT_MASKING:
            # Each span on its own, as str.replace replaced each occurrence (touching spans are not merged).
            masked_text = replace_spans(text, spans, self.mask_text() if self.masking == "replace" else "")
            masked_ids, _ = self.tokenize(masked_text)
        elif self.masking == "token":
            mask_id = spa.resolve_mask_token_id(self.tokenizer, self.mask_string())
            masked_ids = spa.masked_prompt_ids(ids, anchor_mask, mask_id)
            masked_text = self.tokenizer.decode(masked_ids, skip_special_tokens=False)
        else:  # attention: same ids, anchored positions hidden from the masked view
            masked_ids, masked_text = list(ids), text
        return ModelInputs(
            task_id=task["task_id"], benchmark=benchmark, condition=condition, prompt_text=text, anchor_spans=spans,
            input_ids=ids, anchor_mask=anchor_mask, masking=self.masking, masked_prompt_text=masked_text,
            masked_input_ids=masked_ids, max_new_tokens=self.budget(len(ids)), quirks=quirks, built=built,
        )

    def mask_text(self) -> str:
        """The mask as text (what ``replace`` masking writes in place of each anchored span)."""
        return mask_string(self.tokenizer, self.mask_string())

    def eos_ids(self, model) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    def decode_options(self, inputs: Sequence[ModelInputs]) -> dict:
        """Extra ``spa.decode`` arguments (stops) for a batch of ``inputs``, in that order."""
        raise NotImplementedError

    def solution(self, task: dict, inputs: ModelInputs, generated_ids: list[int], eos: list[int]) -> dict:
        """The sample record's program fields for ``generated_ids`` (as ``spa.decode`` returned them)."""
        raise NotImplementedError


class EvalPlusProtocol(Protocol):
    """EvalPlus 0.3.1's prompts, stop strings and sanitizer; the harness's typed spans; BOS as the model expects."""

    def tasks(self, benchmark: str) -> dict[str, dict]:
        return self.test_tasks(benchmark)

    def validate_condition(self, benchmark: str, condition: str) -> str:
        return validate_condition(benchmark, condition)

    def mask_string(self):
        return self.model_cfg.get("mask_token")

    def render(self, task, benchmark, condition):
        built = build_prompt(task, benchmark, self.model_cfg["prompt_style"], condition, self.tokenizer)
        return built.text, tuple(built.anchor_spans), (), built

    def tokenize(self, text):
        anchored = spa.tokenize_anchored(self.tokenizer, text, (), add_bos=self.model_cfg.get("add_bos"))
        return anchored.input_ids, anchored.offsets

    def decode_options(self, inputs):
        stops = inputs[0].built.stop_strings if inputs else []
        return {"stopping_criteria": [StopStringCriteria(self.tokenizer, stops)] if stops else []}

    def solution(self, task, inputs, generated_ids, eos):
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=True)
        record = to_solution(task, inputs.benchmark, self.model_cfg["prompt_style"], text, inputs.built)
        finish = "eos" if generated_ids and generated_ids[-1] in eos else "length" if len(generated_ids) >= inputs.max_new_tokens else "stop"
        return {**record, "completion": text, "finish_reason": finish}


class AuthorsProtocol(Protocol):
    """The paper authors' research code, quirks included (``eval.benchmarks.authors``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = authors.validate_family(self.model_cfg.get("family"), self.model_cfg.get("name", "?"))
        if self.authors_data_dir is None:
            raise ConfigError("protocol=authors needs paths.authors_data_dir (the folder of the authors' task files).")

    def tasks(self, benchmark: str) -> dict[str, dict]:
        """EvalPlus's tasks (tests, entry points) with the authors' prompt and anchor sentence."""
        theirs = load_authors_tasks(benchmark, self.authors_data_dir)
        ours = self.test_tasks(benchmark)
        missing = sorted(set(theirs) - set(ours))
        if missing:
            raise ConfigError(f"The authors' {benchmark} tasks {missing[:5]} are not in the {benchmark} tests of this protocol.")
        key = "info_prompt" if benchmark == "mbpp" else "prompt"
        return {
            task_id: {**ours[task_id], "prompt": record[key],
                      "task_sentence": record["prompt"] if benchmark == "mbpp" else None}
            for task_id, record in theirs.items()
        }

    def validate_condition(self, benchmark, condition):
        return authors.validate_condition(benchmark, condition)

    def mask_string(self):
        try:
            return self.settings.mask_strings[self.family]
        except KeyError:
            raise ConfigError(f"protocol.mask_strings has no entry for family {self.family!r}.") from None

    def render(self, task, benchmark, condition):
        anchored = authors.anchored_spans(benchmark, condition, task["prompt"], task.get("task_sentence"))
        text, spans = authors.render(self.tokenizer, self.family, benchmark, task["prompt"], anchored.spans)
        return text, spans, anchored.quirks, None

    def tokenize(self, text):
        return authors.tokenize(self.tokenizer, self.family, text)

    def decode_options(self, inputs):
        eos = self.tokenizer.eos_token_id
        transcripts: dict[tuple[int, int], authors.Transcript] = {}

        def stop_rule(prompt_index: int, sample_index: int, token: int) -> bool:
            key = (prompt_index, sample_index)
            if key not in transcripts:
                transcripts[key] = authors.Transcript(self.tokenizer, self.family, inputs[prompt_index].input_ids, eos)
            return transcripts[key].feed(token)

        return {"stop_rule": stop_rule}

    def eos_ids(self, model) -> list[int]:
        # Their loop checked the tokenizer's EOS only.
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def solution(self, task, inputs, generated_ids, eos):
        transcript = authors.replay(self.tokenizer, self.family, inputs.input_ids, generated_ids,
                                    self.tokenizer.eos_token_id, inputs.max_new_tokens)
        program = authors.extract_solution(self.family, inputs.benchmark, task["prompt"], transcript.generated)
        record = sanitized_solution(program, task["entry_point"]) if self.settings.sanitize else {
            "solution": program, "raw_solution": program, "sanitized_ok": False, "fallback_reason": "protocol.sanitize=false"}
        return {**record, "completion": transcript.generated, "finish_reason": transcript.finish_reason}


def make_protocol(settings: ProtocolSettings, model_cfg: dict, tokenizer, **kwargs) -> Protocol:
    cls = {"evalplus": EvalPlusProtocol, "authors": AuthorsProtocol}[settings.name]
    return cls(settings, model_cfg, tokenizer, **kwargs)
