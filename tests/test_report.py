"""Aggregation of runs into Tables 1-3 and the method comparison (eval.report, scripts/aggregate.py) on synthetic
results with known per-task outcomes, and the transcriptions of the paper's tables."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from eval.errors import ConfigError, HarnessError
from eval.methods import METHODS
from eval.store import cell_dir
from eval.report import (
    Settings,
    aggregate,
    baseline_of,
    cross_validate_omega,
    load_paper,
    load_runs,
    paired_gain,
    select_omega,
    sign_test_pvalue,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = Settings(bootstrap_resamples=2000)
TASK_PREFIX = {"humaneval": "HumanEval", "mbpp": "Mbpp"}


def write_cell(
    runs: Path,
    experiment: str,
    model: str,
    benchmark: str,
    anchor: str,
    omega: float,
    base: list[bool],
    plus: list[bool] | None = None,
    *,
    status: str = "complete",
    generation: dict | None = None,
    with_results: bool = True,
    protocol: str = "evalplus",
    method: str = "spa",
) -> Path:
    """One run cell in the runner's layout (the store's ``cell_dir``), with one greedy sample per task; ``omega``
    is the method's own strength (SPA's omega, CFG's guidance_scale, CAD's alpha)."""
    plus = base if plus is None else plus
    spec = METHODS[method]
    cell = cell_dir(runs, experiment, model, benchmark, protocol, anchor, omega, method=method, parameter=spec.parameter)
    cell.mkdir(parents=True)
    manifest = {
        "experiment": experiment,
        "model": {"name": model, "hf_id": f"org/{model}", "revision": None},
        "benchmark": benchmark,
        "protocol": protocol,
        "protocol_settings": {"name": protocol, "max_length": None},
        "anchor": anchor,
        "omega": spec.coefficient(omega),
        "method": {"name": method, spec.parameter: float(omega), "omega": spec.coefficient(omega)},
        "spa": {"omega": float(omega), "masking": "token"},
        "generation": generation or {"max_new_tokens": 512, "do_sample": False},
        "status": status,
        "n_tasks": len(base),
        "dataset_sha256": "abc",
        "seed": 0,
    }
    (cell / "manifest.json").write_text(json.dumps(manifest))
    if with_results:
        verdict = {True: "pass", False: "fail"}
        tasks = {
            f"{TASK_PREFIX[benchmark]}/{i}": [{"base_status": verdict[b], "plus_status": verdict[p], "details": None}]
            for i, (b, p) in enumerate(zip(base, plus))
        }
        results = {"benchmark": benchmark, "dataset_sha256": "abc", "dataset_version": "v0", "pass@1": {}, "tasks": tasks}
        (cell / "eval_results.json").write_text(json.dumps(results))
    return cell


def outcomes(n_tasks: int, passing: range | list[int]) -> list[bool]:
    return [i in set(passing) for i in range(n_tasks)]


# 20 tasks: baseline passes 0-4; SPA loses 3-4 and wins 5-12 -> 8 wins vs 2 losses, gain +30 points.
BASE_20 = outcomes(20, range(0, 5))
SPA_20 = outcomes(20, [0, 1, 2, *range(5, 13)])


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    write_cell(runs, "table1", "tiny", "humaneval", "none", 1.0, BASE_20, outcomes(20, range(0, 2)))
    write_cell(runs, "table1", "tiny", "humaneval", "nl", 1.3, SPA_20, outcomes(20, range(0, 6)))
    # A paper model at the paper's HumanEval omega (1.28): found through results/paper/table3.
    write_cell(runs, "table1", "deepseek-coder-6.7b-instruct", "humaneval", "none", 1.0, outcomes(10, range(0, 7)))
    write_cell(runs, "table1", "deepseek-coder-6.7b-instruct", "humaneval", "nl", 1.28, outcomes(10, range(0, 9)))
    return runs


def table(outputs, name: str) -> pd.DataFrame:
    csv = next(data for path, data in outputs.files.items() if path.name == f"{name}.csv")
    return pd.read_csv(io.BytesIO(csv))


def text_of(outputs, file_name: str) -> str:
    return next(data for path, data in outputs.files.items() if path.name == file_name).decode()


def line_with(text: str, *parts: str) -> str:
    return next(line for line in text.splitlines() if all(part in line for part in parts))


def row(frame: pd.DataFrame, **keys: object) -> pd.Series:
    selected = frame
    for key, value in keys.items():
        selected = selected[selected[key] == value]
    assert len(selected) == 1, keys
    return selected.iloc[0]


# ---------------------------------------------------------------------------------------------
# The paper's numbers


def test_paper_transcriptions_match_the_paper() -> None:
    paper = load_paper()
    assert tuple(paper.pass_at_1.loc[("deepseek-coder-6.7b-instruct", "HumanEval")]) == ("6.7B", 73.8, 83.5, 9.7)
    assert paper.pass_at_1.loc[("codellama-7b", "HumanEval+"), "spa"] == 33.5
    assert paper.anchor_gain.loc[("nl", "HumanEval"), "gain"] == 5.48
    assert paper.anchor_gain.loc[("nl+test", "MBPP+"), "gain"] == 3.11
    assert math.isnan(paper.anchor_gain.loc[("nl+code", "MBPP"), "gain"])  # the paper's "-"
    assert paper.optimal_omega.loc[("codellama-7b", "HumanEval"), "omega"] == 1.60
    assert paper.optimal_omega.loc[("deepseek-coder-1.3b-instruct", "MBPP+"), "omega"] == 1.20
    # Every printed gain is SPA minus baseline except one misprint, kept as printed (see the CSV's comment).
    table1 = paper.pass_at_1
    off = table1[(table1["spa"] - table1["baseline"] - table1["gain"]).abs() > 0.05]
    assert list(off.index) == [("deepseek-coder-33b-instruct", "MBPP+")]
    assert len(table1) == 20 and len(paper.anchor_gain) == 16


# ---------------------------------------------------------------------------------------------
# Statistics


def test_sign_test_is_exact_mcnemar_on_discordant_pairs() -> None:
    differences = np.array([1.0] * 8 + [-1.0] * 2 + [0.0] * 30)
    assert sign_test_pvalue(differences) == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert sign_test_pvalue(differences) == pytest.approx(112 / 1024)
    assert sign_test_pvalue(np.zeros(5)) == 1.0


def test_bootstrap_ci_contains_the_gain_and_narrows_with_more_tasks() -> None:
    differences = np.array([1.0] * 8 + [-1.0] * 2 + [0.0] * 10)
    small = paired_gain(differences, resamples=4000, seed=0)
    large = paired_gain(np.tile(differences, 4), resamples=4000, seed=0)
    assert small.gain == pytest.approx(30.0) and large.gain == pytest.approx(30.0)
    assert small.ci_low < small.gain < small.ci_high
    # Width scales as 1/sqrt(n): four times the tasks, about half the width.
    ratio = (large.ci_high - large.ci_low) / (small.ci_high - small.ci_low)
    assert 0.4 < ratio < 0.6
    # Fixed seed: identical on a rerun.
    assert paired_gain(differences, resamples=4000, seed=0) == small


def test_select_omega_breaks_ties_towards_one() -> None:
    assert select_omega(pd.Series({1.0: 0.5, 1.2: 0.7, 1.4: 0.7, 0.9: 0.6})) == 1.2
    assert select_omega(pd.Series({1.0: 0.7, 1.2: 0.7})) == 1.0
    assert select_omega(pd.Series({0.8: 0.7, 1.2: 0.7})) == 0.8


def test_cross_validation_selects_the_known_best_omega_and_scores_held_out_folds() -> None:
    n = 50
    # omega 1.2 passes a superset of what the others pass, so every training split prefers it.
    scores = pd.DataFrame(
        {1.0: outcomes(n, range(0, 20)), 1.2: outcomes(n, range(0, 40)), 1.5: outcomes(n, range(0, 30))},
        index=[f"T/{i}" for i in range(n)],
    ).astype(float)
    selection = cross_validate_omega(scores, folds=5, seed=0)
    assert selection.fold_omegas == (1.2,) * 5
    assert selection.pass_at_1 == pytest.approx(80.0)
    assert selection.held_out.notna().all()


def test_cross_validation_is_honest_when_the_best_omega_is_noise() -> None:
    # Each omega passes a disjoint random half: the test-set argmax looks better than omega 1,
    # the held-out estimate does not.
    rng = np.random.default_rng(1)
    scores = pd.DataFrame({w: rng.random(200) < 0.5 for w in (1.0, 1.1, 1.2, 1.3, 1.4)}).astype(float)
    selection = cross_validate_omega(scores, folds=5, seed=0)
    assert 100 * scores.mean().max() > selection.pass_at_1


# ---------------------------------------------------------------------------------------------
# Tables


def test_table1_exact_numbers_and_paper_side_by_side(runs: Path, tmp_path: Path) -> None:
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table1 = table(outputs, "table1")
    tiny = row(table1, model_key="tiny", benchmark="HumanEval")
    assert tiny.protocol == "evalplus"
    assert (tiny.baseline, tiny.spa, tiny.gain) == pytest.approx((25.0, 55.0, 30.0))
    assert tiny.p_value == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert tiny.gain_ci_low < 30.0 < tiny.gain_ci_high
    assert (tiny.omega, tiny.omega_source, tiny.n_tasks) == (1.3, "table1 run", 20)
    tiny_plus = row(table1, model_key="tiny", benchmark="HumanEval+")
    assert (tiny_plus.baseline, tiny_plus.spa, tiny_plus.gain) == pytest.approx((10.0, 30.0, 20.0))
    assert math.isnan(tiny.paper_baseline)

    deepseek = row(table1, model_key="deepseek-coder-6.7b-instruct", benchmark="HumanEval")
    assert (deepseek.omega, deepseek.omega_source) == (1.28, "paper Table 3")
    assert (deepseek.baseline, deepseek.spa, deepseek.gain) == pytest.approx((70.0, 90.0, 20.0))
    assert (deepseek.paper_baseline, deepseek.paper_spa, deepseek.paper_gain) == (73.8, 83.5, 9.7)
    assert deepseek.model == "DeepSeek-Coder (6.7B)"
    # All five paper models are listed even without runs, with the paper's numbers beside ours.
    assert set(table1.model_key) >= {"codegen-350m-mono", "codellama-7b", "deepseek-coder-33b-instruct"}
    assert "Table 1" in outputs.printed[0] and "83.5" in outputs.printed[0]


def test_missing_cells_are_nan_and_a_dash_never_zero(runs: Path, tmp_path: Path) -> None:
    write_cell(runs, "table1", "codellama-7b", "mbpp", "none", 1.0, outcomes(10, range(3)))
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table1 = table(outputs, "table1")
    no_spa_run = row(table1, model_key="codellama-7b", benchmark="MBPP")  # no cell at the paper's omega 1.2
    assert no_spa_run.baseline == 30.0 and math.isnan(no_spa_run.spa) and math.isnan(no_spa_run.gain)
    mbpp = row(table1, model_key="tiny", benchmark="MBPP")
    assert math.isnan(mbpp.baseline) and math.isnan(mbpp.spa) and math.isnan(mbpp.gain)
    assert "NaN" in text_of(outputs, "table1.csv")
    markdown_row = line_with(text_of(outputs, "table1.md"), "tiny", "| MBPP ")
    cells = [cell.strip() for cell in markdown_row.strip("|").split("|")]
    assert cells[5:9] == ["—", "—", "—", "—"]  # tasks, baseline, SPA, gain
    assert "0.0" not in cells
    latex_row = line_with(text_of(outputs, "table1.tex"), "tiny", "& MBPP &")
    assert "---" in latex_row


def test_incomplete_and_unevaluated_cells_do_not_count(runs: Path, tmp_path: Path) -> None:
    write_cell(runs, "table1", "tiny", "mbpp", "none", 1.0, outcomes(8, range(4)), status="incomplete")
    write_cell(runs, "table1", "tiny", "mbpp", "nl", 1.3, outcomes(8, range(6)), with_results=False)
    loaded = load_runs(runs)
    assert {c.benchmark for c in loaded.cells if c.model == "tiny"} == {"humaneval"}
    assert len(loaded.skipped) == 2
    assert any("status 'incomplete'" in s for s in loaded.skipped)
    assert any("no eval_results.json" in s for s in loaded.skipped)
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    assert math.isnan(row(table(outputs, "table1"), model_key="tiny", benchmark="MBPP").baseline)
    assert sum("not counted" in note for note in outputs.notes) == 2


def test_baseline_is_borrowed_only_from_matching_generation_settings(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_cell(runs, "table1", "tiny", "humaneval", "none", 1.0, outcomes(10, range(2)))
    write_cell(runs, "table1", "tiny", "humaneval", "nl", 1.3, outcomes(10, range(5)))
    write_cell(runs, "sweep", "tiny", "mbpp", "nl", 1.3, outcomes(10, range(5)))
    write_cell(runs, "other", "tiny", "mbpp", "none", 1.0, outcomes(10, range(3)), generation={"max_new_tokens": 64})
    write_cell(runs, "borrow", "tiny", "humaneval", "nl", 1.5, outcomes(10, range(6)))
    loaded = load_runs(runs)
    by_path = {(c.experiment, c.benchmark, c.omega): c for c in loaded.cells}
    borrowed = baseline_of(by_path[("borrow", "humaneval", 1.5)], loaded)
    assert borrowed is not None and borrowed.experiment == "table1"
    assert baseline_of(by_path[("sweep", "mbpp", 1.3)], loaded) is None
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    unpaired = row(table(outputs, "table1"), model_key="tiny", benchmark="MBPP")
    assert unpaired.spa == 50.0 and math.isnan(unpaired.baseline) and math.isnan(unpaired.gain)


def test_table2_averages_over_models_and_marks_not_applicable(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for model, wins in (("tiny", 4), ("my-model", 2)):
        write_cell(runs, "table1", model, "humaneval", "none", 1.0, outcomes(10, range(2)))
        write_cell(runs, "table1", model, "humaneval", "nl", 1.3, outcomes(10, range(2 + wins)))
        write_cell(runs, "table1", model, "humaneval", "nl+test", 1.3, outcomes(10, range(2 + wins // 2)))
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table2 = table(outputs, "table2")
    nl = row(table2, anchor_key="nl", benchmark="HumanEval")
    assert (nl.gain, nl.n_models, nl.paper_gain) == (pytest.approx(30.0), 2, 5.48)
    assert nl.models == "tiny (random weights, demo), my-model"  # unknown models keep their key
    assert row(table2, anchor_key="nl+test", benchmark="HumanEval").gain == pytest.approx(15.0)
    missing = row(table2, anchor_key="nl+code", benchmark="HumanEval")
    assert missing.n_models == 0 and math.isnan(missing.gain) and bool(missing.applicable)
    not_applicable = row(table2, anchor_key="nl+code", benchmark="MBPP")
    assert not bool(not_applicable.applicable) and math.isnan(not_applicable.paper_gain)
    markdown = text_of(outputs, "table2.md")
    assert "n/a" in line_with(markdown, "NL + Code ", "| MBPP ")
    assert "—" in line_with(markdown, "NL + Code ", "| HumanEval ")


def test_table3_and_table1_cross_validated_omega_on_a_known_grid(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    n = 40
    write_cell(runs, "sweep", "tiny", "humaneval", "none", 1.0, outcomes(n, range(10)))
    for omega, passing in ((1.1, 20), (1.2, 30), (1.4, 25)):
        write_cell(runs, "sweep", "tiny", "humaneval", "nl", omega, outcomes(n, range(passing)))
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table3 = row(table(outputs, "table3"), model_key="tiny", benchmark="humaneval")  # one row per dataset pair
    assert (table3.datasets, table3.protocol) == ("HumanEval / HumanEval+", "evalplus")
    assert (table3.test_optimal_omega, table3.test_optimal_base, table3.baseline_base) == (1.2, 75.0, 25.0)
    assert (table3.test_optimal_plus, table3.baseline_plus) == (75.0, 25.0)  # plus = base in this grid
    assert table3.cv_fold_omegas == "1.2 1.2 1.2 1.2 1.2" and table3.cv_folds == 5
    assert (table3.cv_omega, table3.cv_base_spa, table3.cv_base_gain) == pytest.approx((1.2, 75.0, 50.0))
    assert (table3.cv_plus_spa, table3.cv_plus_gain) == pytest.approx((75.0, 50.0))
    assert table3.sweep_omegas == "1 1.1 1.2 1.4"
    assert "5-fold CV" in outputs.printed[2]
    # Not a paper model and no table1 experiment: Table 1 falls back to the (labelled) test-set argmax.
    table1 = row(table(outputs, "table1"), model_key="tiny", benchmark="HumanEval")
    assert (table1.omega, table1.omega_source) == (1.2, "test-set argmax (optimistic)")
    assert table1.gain == pytest.approx(50.0)
    assert table1.cv_spa == pytest.approx(75.0)
    figure4 = table(outputs, "figure4_omega")
    assert list(figure4[figure4.benchmark == "HumanEval"].omega) == [1.0, 1.1, 1.2, 1.4]


def test_protocols_get_their_own_rows_and_never_share_a_baseline(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # evalplus: baseline and SPA. authors: SPA only, with otherwise identical settings and dataset hash.
    write_cell(runs, "table1", "tiny", "humaneval", "none", 1.0, outcomes(10, range(2)))
    write_cell(runs, "table1", "tiny", "humaneval", "nl", 1.3, outcomes(10, range(5)))
    write_cell(runs, "table1", "tiny", "humaneval", "nl", 1.3, outcomes(10, range(7)), protocol="authors")
    for protocol in ("evalplus", "authors"):
        write_cell(runs, "table1", "deepseek-coder-6.7b-instruct", "humaneval", "nl", 1.28, outcomes(4, range(3)),
                   protocol=protocol)
    loaded = load_runs(runs)
    by_key = {(c.protocol, c.anchor): c for c in loaded.cells if c.model == "tiny"}
    assert set(by_key) == {("evalplus", "none"), ("evalplus", "nl"), ("authors", "nl")}
    assert baseline_of(by_key[("evalplus", "nl")], loaded) is by_key[("evalplus", "none")]
    assert baseline_of(by_key[("authors", "nl")], loaded) is None  # never the other protocol's baseline
    assert by_key[("authors", "nl")].fingerprint != by_key[("evalplus", "nl")].fingerprint

    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table1 = table(outputs, "table1")
    tiny = table1[(table1.model_key == "tiny") & (table1.benchmark == "HumanEval")]
    assert list(tiny.protocol) == ["evalplus", "authors"]  # two rows, side by side
    assert list(tiny.index) == [tiny.index[0], tiny.index[0] + 1]
    evalplus, authors = row(tiny, protocol="evalplus"), row(tiny, protocol="authors")
    assert (evalplus.baseline, evalplus.spa, evalplus.gain) == pytest.approx((20.0, 50.0, 30.0))
    assert authors.spa == 70.0 and math.isnan(authors.baseline) and math.isnan(authors.gain)
    table2 = table(outputs, "table2")
    nl = table2[(table2.anchor_key == "nl") & (table2.benchmark == "HumanEval")]
    assert list(nl.protocol) == ["evalplus", "authors"] and list(nl.n_models) == [1, 0]
    assert row(nl, protocol="evalplus").gain == pytest.approx(30.0) and math.isnan(row(nl, protocol="authors").gain)
    # A paper model with runs under both protocols: two rows, each beside the paper's numbers.
    deepseek = table1[(table1.model_key == "deepseek-coder-6.7b-instruct") & (table1.benchmark == "HumanEval")]
    assert list(deepseek.protocol) == ["evalplus", "authors"] and list(deepseek.paper_spa) == [83.5, 83.5]
    markdown = text_of(outputs, "table1.md")
    assert "| Protocol " in markdown
    assert "| 70.0 " in line_with(markdown, "tiny", "| HumanEval ", "| authors ")

    # A baseline of the same protocol in another experiment with matching settings is borrowed;
    # the sweep of each protocol has only its own cells.
    write_cell(runs, "other", "tiny", "humaneval", "none", 1.0, outcomes(10, range(3)), protocol="authors")
    loaded = load_runs(runs)
    authors_spa = next(c for c in loaded.cells if (c.model, c.protocol, c.anchor) == ("tiny", "authors", "nl"))
    borrowed = baseline_of(authors_spa, loaded)
    assert borrowed is not None and (borrowed.experiment, borrowed.protocol) == ("other", "authors")
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    authors = row(table(outputs, "table1"), model_key="tiny", benchmark="HumanEval", protocol="authors")
    assert (authors.baseline, authors.spa, authors.gain) == pytest.approx((30.0, 70.0, 40.0))
    figure4 = table(outputs, "figure4_omega")
    tiny4 = figure4[(figure4.model_key == "tiny") & (figure4.benchmark == "HumanEval")]
    assert list(zip(tiny4.protocol, tiny4.omega, tiny4.pass_at_1)) == [
        ("evalplus", 1.0, 20.0), ("evalplus", 1.3, 50.0), ("authors", 1.0, 30.0), ("authors", 1.3, 70.0)
    ]
    table3 = table(outputs, "table3")
    assert list(table3[(table3.model_key == "tiny") & (table3.benchmark == "humaneval")].protocol) == ["evalplus", "authors"]
    figure_names = {path.name for path in aggregate(runs, tmp_path / "out", "figures", FAST).files}
    assert {"figure4_omega-evalplus.png", "figure4_omega-authors.pdf"} <= figure_names  # one Figure 4 per protocol
    assert "figure4_omega.png" not in figure_names


def test_table3_picks_one_omega_per_dataset_pair(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    n = 40
    # (base passes, plus passes) out of 40: HumanEval alone would pick 1.1, HumanEval+ alone 1.4;
    # the pair score (mean of base and plus per task) peaks at 1.2: 26 vs 20, 25, 9 tasks.
    grid = {1.0: (10, 8), 1.1: (30, 10), 1.2: (28, 24), 1.4: (25, 25)}
    for omega, (base, plus) in grid.items():
        anchor = "none" if omega == 1.0 else "nl"
        write_cell(runs, "sweep", "tiny", "humaneval", anchor, omega, outcomes(n, range(base)), outcomes(n, range(plus)))
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)
    table3 = table(outputs, "table3")
    pair = row(table3, model_key="tiny", benchmark="humaneval")
    assert len(table3[table3.model_key == "tiny"]) == 2  # one row per pair: HumanEval(+) and MBPP(+)
    assert pair.test_optimal_omega == 1.2
    assert (pair.test_optimal_base, pair.test_optimal_plus) == (70.0, 60.0)  # Pass@1 on both at that omega
    assert (pair.baseline_base, pair.baseline_plus) == (25.0, 20.0)
    folds = [float(w) for w in pair.cv_fold_omegas.split()]
    assert len(folds) == pair.cv_folds == 5 and pair.cv_omega == pytest.approx(np.mean(folds))
    # Table 1: both columns of the pair use the same omega, for the SPA cell and for the CV columns.
    table1 = table(outputs, "table1")
    base_row = row(table1, model_key="tiny", benchmark="HumanEval")
    plus_row = row(table1, model_key="tiny", benchmark="HumanEval+")
    assert base_row.omega == plus_row.omega == 1.2
    assert base_row.omega_source == plus_row.omega_source == "test-set argmax (optimistic)"
    assert (base_row.spa, plus_row.spa) == (70.0, 60.0)
    assert base_row.cv_fold_omegas == plus_row.cv_fold_omegas == pair.cv_fold_omegas
    assert base_row.cv_omega == plus_row.cv_omega == pytest.approx(pair.cv_omega)
    assert (base_row.cv_spa, plus_row.cv_spa) == pytest.approx((pair.cv_base_spa, pair.cv_plus_spa))
    assert (base_row.cv_gain, plus_row.cv_gain) == pytest.approx((pair.cv_base_gain, pair.cv_plus_gain))
    # The paper's models: one Table 3 omega per pair, as printed.
    deepseek = row(table3, model_key="deepseek-coder-6.7b-instruct", benchmark="mbpp")
    assert (deepseek.datasets, deepseek.paper_omega) == ("MBPP / MBPP+", 1.25)


def test_table3_states_the_number_of_folds_actually_used(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_cell(runs, "sweep", "tiny", "humaneval", "none", 1.0, outcomes(4, range(1)))
    write_cell(runs, "sweep", "tiny", "humaneval", "nl", 1.3, outcomes(4, range(3)))
    outputs = aggregate(runs, tmp_path / "out", "tables", FAST)  # cv_folds = 5, but only 4 tasks
    pair = row(table(outputs, "table3"), model_key="tiny", benchmark="humaneval")
    assert pair.cv_folds == 4 and len(pair.cv_fold_omegas.split()) == 4
    title = text_of(outputs, "table3.md").splitlines()[0]
    assert "4-fold CV" in title and "5-fold" not in title
    assert "| CV folds " in text_of(outputs, "table3.md")
    assert row(table(outputs, "table1"), model_key="tiny", benchmark="HumanEval").cv_folds == 4


def test_a_manifest_without_protocol_is_not_counted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cell = write_cell(runs, "table1", "tiny", "humaneval", "none", 1.0, outcomes(4, range(1)))
    old = runs / "table1" / "tiny" / "humaneval" / "none" / "omega=1.0"  # the layout before protocols
    old.parent.mkdir(parents=True)
    cell.rename(old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["protocol"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_runs(runs)
    assert loaded.cells == [] and len(loaded.skipped) == 1 and "names no protocol" in loaded.skipped[0]


def test_corrupt_results_raise_one_paragraph_naming_the_file(runs: Path) -> None:
    broken = runs / "table1" / "tiny" / "humaneval" / "evalplus" / "nl" / "omega=1.3" / "eval_results.json"
    broken.write_text('{"benchmark": "humaneval", "tasks": {')
    with pytest.raises(HarnessError) as error:
        load_runs(runs)
    message = str(error.value)
    assert str(broken) in message and "rerun" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# The command line


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "aggregate.py"), "bootstrap_resamples=1000", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_every_table_and_nothing_else(runs: Path, tmp_path: Path) -> None:
    result = run_cli(tmp_path, f"runs_dir={runs}", f"out_dir={tmp_path / 'out'}", "what=tables")
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    stems = ["figure4_omega", "table1", "table2", "table3"]
    assert written == ["provenance.json", "tables"] + sorted(f"tables/{s}.{e}" for s in stems for e in ("csv", "md", "tex"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]  # no Hydra outputs/ or logs
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["cells"] and all((runs / c["path"] / "manifest.json").is_file() for c in provenance["cells"])
    assert provenance["packages"]["pandas"] and provenance["git"]["commit"]
    assert "| DeepSeek-Coder (6.7B)" in result.stdout and "73.8" in result.stdout


def test_cli_corrupt_json_exits_2_and_writes_nothing(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "table1.csv").write_text("earlier results\n")
    broken = runs / "table1" / "deepseek-coder-6.7b-instruct" / "humaneval" / "evalplus" / "none" / "omega=1.0" / "manifest.json"
    broken.write_text("{not json")
    result = run_cli(tmp_path, f"runs_dir={runs}", f"out_dir={out}")
    assert result.returncode == 2
    assert str(broken) in result.stderr and "Traceback" not in result.stderr
    assert (out / "tables" / "table1.csv").read_text() == "earlier results\n"
    assert sorted(p.name for p in out.rglob("*")) == ["table1.csv", "tables"]


def test_cli_takes_relative_paths_from_the_project_root_wherever_it_runs(runs: Path, tmp_path: Path, monkeypatch, capsys):
    # The project root is tmp_path here (eval.experiments.settings.project_path reads it), so that nothing is
    # written into the real project's results/; the command runs from another folder, with relative paths.
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    from eval.experiments import settings

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(elsewhere)
    script = REPO_ROOT / "scripts" / "aggregate.py"
    argv = [str(script), "bootstrap_resamples=1000", "runs_dir=runs", "out_dir=out", "what=tables"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
    assert (tmp_path / "out" / "tables" / "table1.csv").is_file() and (tmp_path / "out" / "provenance.json").is_file()
    assert list(elsewhere.iterdir()) == []
    assert f"files under {tmp_path / 'out'}" in capsys.readouterr().err


def test_bad_options_are_config_errors_with_exit_code_2(runs: Path, tmp_path: Path) -> None:
    # The CLI turns every HarnessError into its message and exit code (see the corrupt-JSON test).
    with pytest.raises(ConfigError, match="what='everything' is invalid") as error:
        aggregate(runs, tmp_path / "out", "everything", FAST)
    assert error.value.exit_code == 2
    with pytest.raises(ConfigError, match="cv_folds='five' is invalid"):
        Settings.from_config({"cv_folds": "five"})
    with pytest.raises(ConfigError, match="cv_folds=1 is invalid"):
        Settings.from_config({"cv_folds": 1, "runs_dir": "ignored"})


# ---------------------------------------------------------------------------------------------
# Methods beside SPA (CFG, CAD)


@pytest.fixture
def method_runs(tmp_path: Path) -> Path:
    """40 tasks; each grid passes a prefix of the tasks, so every fold's choice is the grid's best."""
    runs = tmp_path / "runs"
    n = 40
    write_cell(runs, "baselines", "tiny", "humaneval", "none", 1.0, outcomes(n, range(10)))
    for omega, passing in ((1.2, 30), (1.4, 25)):
        write_cell(runs, "baselines", "tiny", "humaneval", "nl", omega, outcomes(n, range(passing)))
    for scale, passing in ((1.25, 20), (1.5, 35)):
        write_cell(runs, "baselines", "tiny", "humaneval", "none", scale, outcomes(n, range(passing)), method="cfg")
    for alpha, passing in ((0.25, 15), (0.5, 28)):
        write_cell(runs, "baselines", "tiny", "humaneval", "nl", alpha, outcomes(n, range(passing)), method="cad")
    write_cell(runs, "baselines", "tiny", "humaneval", "nl", 1.0, outcomes(n, range(40)), method="cad", status="incomplete")
    return runs


def test_method_cells_are_read_from_their_own_level(method_runs: Path) -> None:
    loaded = load_runs(method_runs)
    keys = sorted((c.method, c.anchor, c.strength, c.omega) for c in loaded.cells)
    assert keys == [("cad", "nl", 0.25, 1.25), ("cad", "nl", 0.5, 1.5), ("cfg", "none", 1.25, 1.25), ("cfg", "none", 1.5, 1.5),
                    ("spa", "nl", 1.2, 1.2), ("spa", "nl", 1.4, 1.4), ("spa", "none", 1.0, 1.0)]
    cad = next(c for c in loaded.cells if c.method == "cad")
    assert cad.path.relative_to(method_runs).parts[4:] == ("cad", "nl", f"alpha={cad.strength}")
    assert any("alpha=1.0: status 'incomplete'" in note for note in loaded.skipped), "a method's cell counts as SPA's do"


def test_methods_table_at_cross_validated_strengths_with_paired_gains(method_runs: Path, tmp_path: Path) -> None:
    outputs = aggregate(method_runs, tmp_path / "out", "all", FAST)
    methods = table(outputs, "methods")
    humaneval = methods[methods.benchmark == "HumanEval"]
    assert list(zip(humaneval.method, humaneval.second_view)) == [
        ("SPA", "NL masked"), ("CFG", "last prompt token"), ("CAD", "NL deleted")]  # variants with cells, in order
    spa = row(humaneval, method_key="spa")
    assert (spa.cv_strength, spa.pass_at_1, spa.plain, spa.gain) == pytest.approx((1.2, 75.0, 25.0, 50.0))
    assert spa.strengths == "1 1.2 1.4" and math.isnan(spa.vs_spa_gain)
    cfg = row(humaneval, method_key="cfg")
    assert (cfg.parameter, cfg.anchor, cfg.strengths, cfg.cv_fold_strengths) == ("guidance_scale", "none", "1 1.25 1.5", "1.5 " * 4 + "1.5")
    assert (cfg.cv_strength, cfg.pass_at_1, cfg.gain, cfg.vs_spa_gain) == pytest.approx((1.5, 87.5, 62.5, 12.5))
    assert cfg.vs_spa_gain_ci_low <= 12.5 <= cfg.vs_spa_gain_ci_high
    assert cfg.vs_spa_p_value == pytest.approx(binomtest(5, 5, 0.5).pvalue)  # 5 tasks only CFG passes, none only SPA
    cad = row(humaneval, method_key="cad")
    assert (cad.parameter, cad.strengths, cad.test_optimal_strength) == ("alpha", "0 0.25 0.5", 0.5)
    assert (cad.cv_strength, cad.pass_at_1, cad.gain, cad.vs_spa_gain) == pytest.approx((0.5, 70.0, 45.0, -5.0))
    assert cad.n_tasks == 40 and cad.sweep_experiment == "baselines"
    assert len(methods[methods.benchmark == "MBPP"]) == 0, "no rows without any method's cells"
    markdown = text_of(outputs, "methods.md")
    assert "| vs SPA [95% CI]" in markdown and "+12.5 [" in line_with(markdown, "| CFG ", "| HumanEval ")

    strength = table(outputs, "methods_strength")
    cad_points = strength[(strength.method_key == "cad") & (strength.benchmark == "HumanEval")]
    assert list(zip(cad_points.strength, cad_points.weight, cad_points.pass_at_1)) == [(0.0, 1.0, 25.0), (0.25, 1.25, 37.5), (0.5, 1.5, 70.0)]
    assert set(strength.method) == {"SPA (NL masked)", "CFG (last prompt token)", "CAD (NL deleted)"}
    figure_names = {path.name for path in outputs.files if path.parent.name == "figures"}
    assert {"methods_strength-evalplus.png", "methods_strength-evalplus.pdf"} <= figure_names
    # SPA's own tables are the same as without the other methods: they read SPA's cells only.
    assert row(table(outputs, "table3"), model_key="tiny", benchmark="humaneval").test_optimal_omega == 1.2


def test_without_other_methods_there_is_no_methods_table(runs: Path, tmp_path: Path) -> None:
    outputs = aggregate(runs, tmp_path / "out", "all", FAST)
    assert not any(path.name.startswith("methods") for path in outputs.files)
    assert any(note.startswith("methods and methods_strength skipped") for note in outputs.notes)


def test_spa_cells_written_before_methods_are_read_as_spa(runs: Path) -> None:
    before = {(c.model, c.anchor, c.omega, c.method) for c in load_runs(runs).cells}
    for manifest_path in runs.rglob("manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        del manifest["method"]
        manifest_path.write_text(json.dumps(manifest))
    assert {(c.model, c.anchor, c.omega, c.method) for c in load_runs(runs).cells} == before
    assert {method for *_, method in before} == {"spa"}


def test_a_method_cell_outside_its_level_is_not_counted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cell = write_cell(runs, "unit", "tiny", "humaneval", "nl", 0.5, outcomes(4, range(2)), method="cad")
    spa_layout = runs / "unit" / "tiny" / "humaneval" / "evalplus" / "nl" / "alpha=0.5"
    spa_layout.parent.mkdir(parents=True)
    cell.rename(spa_layout)
    loaded = load_runs(runs)
    assert loaded.cells == [] and "not a cell directory of the results layout" in loaded.skipped[0]
