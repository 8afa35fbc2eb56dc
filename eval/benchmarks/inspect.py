"""See what the model sees: both views of every task under a protocol, as ids and as text.

``scripts/inspect_prompts.py`` writes one JSON line per task (``task_id``, ``prompt_text``,
``masked_prompt_text``, ``input_ids``, ``masked_input_ids``: exactly the ids the model receives, BOS
included, ``anchored_text``, lengths and quirks), prints a few tasks with the anchored text highlighted and
can write an HTML page to scroll through. Only a tokenizer is loaded, so it runs offline with the files in
``../shared/data/tokenizers/`` (``model.tokenizer_id=...``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from eval.benchmarks.protocols import ModelInputs

_ON, _OFF = "\033[30;43m", "\033[0m"  # black on yellow


def record(inputs: ModelInputs) -> dict:
    return {
        "task_id": inputs.task_id,
        "benchmark": inputs.benchmark,
        "condition": inputs.condition,
        "masking": inputs.masking,
        "prompt_text": inputs.prompt_text,
        "masked_prompt_text": inputs.masked_prompt_text,
        "input_ids": inputs.input_ids,
        "masked_input_ids": inputs.masked_input_ids,
        "anchored_text": inputs.anchored_text,
        "anchor_spans": [list(span) for span in inputs.anchor_spans],
        "n_prompt_tokens": len(inputs.input_ids),
        "n_masked_prompt_tokens": len(inputs.masked_input_ids),
        "n_anchored_tokens": sum(inputs.anchor_mask),
        "max_new_tokens": inputs.max_new_tokens,
        "quirks": list(inputs.quirks),
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for entry in records:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    tmp.replace(path)


def highlight(text: str, spans, *, color: bool) -> str:
    """``text`` with each span marked: reverse colours on a terminal, «guillemets» otherwise."""
    on, off = (_ON, _OFF) if color else ("«", "»")
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], on, text[start:end], off]
        cursor = end
    return "".join(pieces) + text[cursor:]


def terminal_view(inputs: ModelInputs, *, color: bool) -> str:
    quirks = f"  quirks: {', '.join(inputs.quirks)}" if inputs.quirks else ""
    return (
        f"=== {inputs.task_id}  ({inputs.benchmark}, anchor={inputs.condition}, masking={inputs.masking}; "
        f"{len(inputs.input_ids)} ids, masked view {len(inputs.masked_input_ids)} ids, "
        f"{sum(inputs.anchor_mask)} anchored, budget {inputs.max_new_tokens} new){quirks}\n"
        f"--- original view (anchored text highlighted)\n{highlight(inputs.prompt_text, inputs.anchor_spans, color=color)}\n"
        f"--- masked view\n{inputs.masked_prompt_text}\n"
    )


def html_page(title: str, items: list[ModelInputs]) -> str:
    rows = []
    for inputs in items:
        original, cursor = [], 0
        for start, end in inputs.anchor_spans:
            original += [html.escape(inputs.prompt_text[cursor:start]), "<mark>", html.escape(inputs.prompt_text[start:end]), "</mark>"]
            cursor = end
        original.append(html.escape(inputs.prompt_text[cursor:]))
        rows.append(
            f"<section><h2>{html.escape(inputs.task_id)}</h2><p>{len(inputs.input_ids)} ids; masked view "
            f"{len(inputs.masked_input_ids)} ids; {sum(inputs.anchor_mask)} anchored; budget {inputs.max_new_tokens} new tokens"
            f"{'; quirks: ' + html.escape(', '.join(inputs.quirks)) if inputs.quirks else ''}</p>"
            f"<div class=views><div><h3>original</h3><pre>{''.join(original)}</pre></div>"
            f"<div><h3>masked</h3><pre>{html.escape(inputs.masked_prompt_text)}</pre></div></div></section>"
        )
    style = ("body{font-family:sans-serif;margin:2em} pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em} "
             "mark{background:#ffd54f} .views{display:grid;grid-template-columns:1fr 1fr;gap:1em}")
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
            f"<h1>{html.escape(title)}</h1>{''.join(rows)}")
