"""See exactly what the model receives under a protocol: both views of every task, as ids and text.

    python scripts/inspect_prompts.py model=codellama-7b model.tokenizer_id=../shared/data/tokenizers/codellama-7b \
        benchmark=humaneval anchor=nl protocol=authors out=inputs.jsonl html=inputs.html

Writes one JSON line per task (README "Protocols"), prints a few tasks with the anchored text highlighted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from eval.benchmarks.inspect import html_page, record, terminal_view, write_jsonl
from eval.cli import exit_on_harness_error, run_main
from eval.runner import build_protocol, load_tokenizer, select_tasks


@hydra.main(config_path="../configs", config_name="inspect_prompts", version_base="1.3")
@exit_on_harness_error()
def main(cfg: DictConfig) -> None:
    protocol = build_protocol(cfg, load_tokenizer(cfg))
    benchmark, condition = cfg.benchmark.name, cfg.anchor.condition
    protocol.validate_condition(benchmark, condition)
    tasks = protocol.tasks(benchmark)
    items = [protocol.model_inputs(tasks[t], benchmark, condition) for t in select_tasks(cfg, tasks)]
    for inputs in items[: int(cfg.show)]:
        print(terminal_view(inputs, color=sys.stdout.isatty()))
    if cfg.out:
        write_jsonl(Path(to_absolute_path(cfg.out)), [record(i) for i in items])
        print(f"wrote {len(items)} tasks to {cfg.out}")
    if cfg.html:
        page = Path(to_absolute_path(cfg.html))
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(html_page(f"{cfg.model.name} {benchmark} anchor={condition} protocol={protocol.name}", items), encoding="utf-8")
        print(f"wrote {page}")


if __name__ == "__main__":
    run_main(main)
