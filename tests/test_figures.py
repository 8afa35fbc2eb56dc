"""Figures of the aggregator (eval.figures, via eval.report.aggregate): attention dilution
(Figures 2 and 3), omega = 1 versus SPA, and Figure 4, on synthetic attention and sweep data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval import figures
from eval.errors import HarnessError
from eval.report import Settings, aggregate, attention_curves, load_runs

FAST = Settings(bootstrap_resamples=1000)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_attention_cell(
    runs: Path, model: str, omega: float, lengths: list[int], *, status: str = "complete", protocol: str = "evalplus"
) -> Path:
    """An attention run: per task, prompt share decaying with the generated-token step."""
    cell = runs / "attention" / model / "humaneval" / protocol / f"omega={float(omega)}"
    cell.mkdir(parents=True)
    manifest = {"experiment": "attention", "model": {"name": model}, "benchmark": "humaneval", "protocol": protocol,
                "anchor": "nl", "omega": float(omega), "status": status, "n_tasks": len(lengths)}
    (cell / "manifest.json").write_text(json.dumps(manifest))
    rng = np.random.default_rng(len(lengths))
    lines = []
    for i, length in enumerate(lengths):
        steps = list(range(length))
        share = np.clip(0.8 / (1 + np.arange(length) / 50) * omega + rng.normal(0, 0.02, length), 0, 1)
        lines.append(json.dumps({"task_id": f"HumanEval/{i}", "n_prompt_tokens": 100, "n_generated": length,
                                 "self_steps": steps, "self_prompt_share": share.tolist(),
                                 "grad_steps": steps[::5], "grad_prompt_share": (share[::5] * 0.9).tolist()}))
    (cell / "attention.jsonl").write_text("\n".join(lines) + "\n")
    return cell


def figure_files(outputs) -> dict[str, bytes]:
    return {path.name: data for path, data in outputs.files.items() if path.parent.name == "figures"}


def test_attention_figures_are_drawn_for_synthetic_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for model in ("deepseek-coder-1.3b-instruct", "tiny"):
        write_attention_cell(runs, model, 1.0, [60, 120, 450, 300])
    write_attention_cell(runs, "tiny", 1.3, [80, 200, 420])
    outputs = aggregate(runs, tmp_path / "out", "figures", FAST)
    files = figure_files(outputs)
    for stem in ("figure2_self_attention", "figure3_gradient_attention", "attention_spa_vs_plain"):
        name = f"{stem}-evalplus"  # one set of figures per protocol
        assert files[f"{name}.png"].startswith(PNG_MAGIC) and len(files[f"{name}.png"]) > 10_000
        assert files[f"{name}.pdf"].startswith(b"%PDF")
    assert not any(name.startswith("figure4_omega") for name in files)  # no sweep: skipped, no empty figure
    assert any(note.startswith("figure4_omega skipped") for note in outputs.notes)
    curves = pd.read_csv(io.BytesIO(next(d for p, d in outputs.files.items() if p.name == "attention_curves.csv")))
    assert curves["step"].max() == 399  # the first 400 generated tokens
    assert set(curves["protocol"]) == {"evalplus"}
    # The same data as Markdown and LaTeX tables (one row per protocol, model, omega, kind and step).
    tables = {path.name: data.decode() for path, data in outputs.files.items() if path.parent.name == "tables"}
    markdown, latex = tables["attention_curves.md"], tables["attention_curves.tex"]
    assert "| Protocol " in markdown and "| evalplus " in markdown and "DeepSeek-Coder (1.3B)" in markdown
    assert len(markdown.splitlines()) == len(curves) + 4  # title, blank line, header, rule
    assert r"\toprule" in latex and "evalplus" in latex and r"\label{tab:attention_curves}" in latex
    # write_outputs is what makes them files; aggregate itself writes nothing.
    assert not (tmp_path / "out").exists()


def test_attention_curves_mean_band_and_sequences_alive() -> None:
    attention = pd.DataFrame(
        {"protocol": "evalplus", "model": "m", "benchmark": "humaneval", "omega": 1.0, "kind": "self",
         "task_id": ["a", "b", "c", "a", "b", "a"], "step": [0, 0, 0, 1, 1, 2], "share": [0.2, 0.4, 0.6, 0.5, 0.5, 0.9]}
    )
    curves = attention_curves(attention, max_step=400).set_index("step")
    assert list(curves["n"]) == [3, 2, 1]
    assert curves.loc[0, "mean"] == pytest.approx(40.0)
    half = 1.96 * np.std([0.2, 0.4, 0.6], ddof=1) / np.sqrt(3) * 100
    assert (curves.loc[0, "low"], curves.loc[0, "high"]) == pytest.approx((40 - half, 40 + half))
    assert curves.loc[1, "low"] == curves.loc[1, "high"] == pytest.approx(50.0)  # no spread
    assert np.isnan(curves.loc[2, "low"])  # one sequence left: no band
    assert list(attention_curves(attention, max_step=2)["step"]) == [0, 1]  # steps 0..max_step-1


def test_spa_comparison_needs_a_second_omega(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_attention_cell(runs, "tiny", 1.0, [50, 90])
    write_attention_cell(runs, "codellama-7b", 1.0, [40, 70], status="incomplete")
    outputs = aggregate(runs, tmp_path / "out", "figures", FAST)
    files = figure_files(outputs)
    assert "figure2_self_attention-evalplus.png" in files and "attention_spa_vs_plain-evalplus.png" not in files
    assert any(note.startswith("attention_spa_vs_plain-evalplus skipped") for note in outputs.notes)
    assert any("status 'incomplete'" in note for note in outputs.notes)


def test_corrupt_attention_line_names_file_and_line(tmp_path: Path) -> None:
    cell = write_attention_cell(tmp_path / "runs", "tiny", 1.0, [10])
    with (cell / "attention.jsonl").open("a") as handle:
        handle.write('{"task_id": "HumanEval/1", "self_steps": [0, 1], "self_prompt_share": [0.5]}\n')
    expected = r"attention\.jsonl has 'self_steps' and 'self_prompt_share' of different lengths on line 2"
    with pytest.raises(HarnessError, match=expected):
        load_runs(tmp_path / "runs")


def test_omega_sweep_figure_has_one_panel_per_benchmark_column() -> None:
    sweep = pd.DataFrame(
        {"model": ["A", "A", "A", "B", "B"], "benchmark": ["HumanEval"] * 3 + ["MBPP"] * 2,
         "omega": [1.0, 1.2, 1.4, 1.0, 1.3], "pass_at_1": [30.0, 34.0, 31.0, 50.0, 52.0]}
    )
    panels = ["HumanEval", "HumanEval+", "MBPP", "MBPP+"]
    figure = figures.omega_sweep_figure(sweep, panels, {"A": "C0", "B": "C1"})
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == panels
    assert len(axes[0].get_lines()) == 2  # model A and the omega = 1 marker
    assert [t.get_text() for t in axes[1].texts] == ["no runs"]
    rendered = figures.render(figure)
    assert rendered["png"].startswith(PNG_MAGIC) and rendered["pdf"].startswith(b"%PDF")
    assert b"CreationDate" not in rendered["pdf"]  # no timestamp in the file


def test_attention_axis_ends_where_the_data_ends(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_attention_cell(runs, "tiny", 1.0, [40, 25])
    write_attention_cell(runs, "tiny", 1.3, [30, 20])
    curves = attention_curves(load_runs(runs).attention, max_step=400).assign(label="tiny")
    assert curves["step"].max() == 39
    plain = curves[curves["omega"] == 1.0]
    figure = figures.attention_figure(plain[plain["kind"] == "self"], ["tiny"], {}, "t", max_step=400)
    assert [ax.get_xlim()[1] for ax in figure.get_axes()] == [40, 40]  # tokens 0-39, not a 0-400 axis
    figure = figures.spa_vs_plain_figure(curves, ["tiny"], max_step=400)
    assert {ax.get_xlim()[1] for ax in figure.get_axes()} == {40}
    # Longer data is still cut at max_step.
    long = write_attention_cell(tmp_path / "long", "tiny", 1.0, [450, 300])
    curves = attention_curves(load_runs(long.parents[4]).attention, max_step=400).assign(label="tiny")
    figure = figures.attention_figure(curves[curves["kind"] == "self"], ["tiny"], {}, "t", max_step=400)
    assert figure.get_axes()[1].get_xlim()[1] == 400


def test_one_set_of_figures_per_protocol(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_attention_cell(runs, "tiny", 1.0, [50, 90])
    write_attention_cell(runs, "tiny", 1.0, [30, 60], protocol="authors")
    write_attention_cell(runs, "tiny", 1.3, [30, 60], protocol="authors")
    outputs = aggregate(runs, tmp_path / "out", "figures", FAST)
    files = figure_files(outputs)
    for protocol in ("evalplus", "authors"):
        assert f"figure2_self_attention-{protocol}.png" in files and f"figure3_gradient_attention-{protocol}.pdf" in files
    assert "attention_spa_vs_plain-authors.png" in files and "attention_spa_vs_plain-evalplus.png" not in files
    assert not any(name.startswith("figure2_self_attention.") for name in files)
    curves = pd.read_csv(io.BytesIO(next(d for p, d in outputs.files.items() if p.name == "attention_curves.csv")))
    assert list(curves.groupby("protocol")["step"].max().sort_index()) == [59, 89]  # authors, evalplus: never pooled
