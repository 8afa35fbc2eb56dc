"""Aggregation of finished runs into the paper's Tables 1-3 and Figures 2-4, with statistics.

Reads ``results/runs`` (layout in docs/aggregation.md), pairs every SPA cell with its omega = 1
baseline and puts the result next to the paper's numbers (``results/paper/*.csv``). Beyond the
paper it reports, for every SPA-minus-baseline gain, a paired-bootstrap 95% CI over tasks and an
exact McNemar p-value, and an omega chosen honestly by k-fold cross-validation over tasks next to
the test-set-optimal omega the paper reports.

Everything is computed in memory first (``aggregate``); ``write_outputs`` then replaces each file
atomically, so bad input (a ``HarnessError``) leaves earlier outputs untouched.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from eval import figures
from eval.errors import ConfigError, HarnessError

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_DIR = REPO_ROOT / "results" / "paper"
PAPER = "Tian & Zhang, ICML 2025"

# Table column -> (benchmark whose runs hold it, per-sample status that decides a pass).
# A plus pass already requires the base tests to pass; the evaluator's plus_status is used as given.
BENCHMARK_COLUMNS: dict[str, tuple[str, str]] = {
    "HumanEval": ("humaneval", "base_status"),
    "HumanEval+": ("humaneval", "plus_status"),
    "MBPP": ("mbpp", "base_status"),
    "MBPP+": ("mbpp", "plus_status"),
}

# The paper's five models in its Table 1 row order, then the offline demo model.
MODEL_NAMES: dict[str, str] = {
    "codegen-350m-mono": "CodeGen-Mono (350M)",
    "deepseek-coder-1.3b-instruct": "DeepSeek-Coder (1.3B)",
    "deepseek-coder-6.7b-instruct": "DeepSeek-Coder (6.7B)",
    "codellama-7b": "CodeLlama (7B)",
    "deepseek-coder-33b-instruct": "DeepSeek-Coder (33B)",
    "tiny": "tiny (random weights, demo)",
}

TABLE2_ANCHORS: dict[str, str] = {
    "nl": "NL",
    "nl+test": "NL + Test",
    "nl+code": "NL + Code",
    "nl+code+test": "NL + Code + Test",
}
# MBPP prompts have no starting code, so the paper prints "-" for these conditions.
NOT_APPLICABLE: frozenset[tuple[str, str]] = frozenset({("nl+code", "mbpp"), ("nl+code+test", "mbpp")})

SPA_ANCHOR = "nl"  # the paper's default anchored text
BASELINE_ANCHOR = "none"  # omega = 1 is the plain model; the runner stores it once, under anchor "none"
BASELINE_OMEGA = 1.0
ATTENTION_EXPERIMENT = "attention"
ATTENTION_KINDS: dict[str, tuple[str, str]] = {  # kind -> (steps field, share field) in attention.jsonl
    "self": ("self_steps", "self_prompt_share"),
    "gradient": ("grad_steps", "grad_prompt_share"),
}

MISSING_MARK = {"md": "—", "tex": "---"}  # no data; never printed as 0
NOT_APPLICABLE_MARK = "n/a"  # the paper's "-": the condition does not exist for that benchmark


@dataclass(frozen=True)
class Settings:
    """Knobs of the aggregation (the Hydra config ``configs/aggregate.yaml``)."""

    cv_folds: int = 5
    seed: int = 0
    bootstrap_resamples: int = 10_000
    table1_experiment: str = "table1"  # preferred where several experiments hold the same cell
    attention_benchmark: str = "humaneval"
    max_step: int = 400  # generated tokens shown in Figures 2 and 3

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Settings:
        """Settings from the keys of ``configs/aggregate.yaml`` (others are ignored)."""
        values = {}
        for spec in fields(cls):
            if spec.name in config:
                kind = type(spec.default)
                try:
                    values[spec.name] = kind(config[spec.name])
                except (TypeError, ValueError):
                    problem = f"{spec.name}={config[spec.name]!r} is invalid: expected {kind.__name__}."
                    raise ConfigError(problem) from None
        return cls(**values)

    def __post_init__(self) -> None:
        if self.cv_folds < 2:
            raise ConfigError(
                f"cv_folds={self.cv_folds} is invalid: cross-validation needs at least 2 folds (default 5)."
            )
        if self.bootstrap_resamples < 100:
            raise ConfigError(
                f"bootstrap_resamples={self.bootstrap_resamples} is too few for a 95% interval; "
                "use 1000 or more (default 10000)."
            )
        if self.max_step < 1:
            raise ConfigError(
                f"max_step={self.max_step} is invalid: it must be a positive number of tokens (default 400)."
            )


# --------------------------------------------------------------------------------------------------
# Loading runs


@dataclass(frozen=True, eq=False)
class Cell:
    """One finished, evaluated run directory."""

    experiment: str
    model: str
    benchmark: str
    anchor: str
    omega: float
    path: Path
    fingerprint: str  # model, generation settings and dataset hash: equal ones may share a baseline
    scores: pd.DataFrame  # index task_id; the benchmark's two table columns; per-task pass rate in [0, 1]


@dataclass
class Runs:
    cells: list[Cell]
    attention: pd.DataFrame  # model, benchmark, omega, kind, task_id, step, share
    skipped: list[str] = field(default_factory=list)  # "path: reason" for cells that do not count

    def find(self, model: str, benchmark: str, anchor: str, omega: float) -> list[Cell]:
        return [
            c
            for c in self.cells
            if (c.model, c.benchmark, c.anchor) == (model, benchmark, anchor) and math.isclose(c.omega, omega)
        ]


def _corrupt(path: Path, problem: str) -> HarnessError:
    return HarnessError(
        f"Result file {path} {problem}. It was probably cut short by an interrupted run or edited by hand. "
        f"Fix: delete that file and rerun its cell (the runner resumes and rewrites it), or move the directory "
        f"{path.parent} out of the runs directory; then aggregate again. Nothing was written."
    )


def _read_json(path: Path) -> object:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"cannot be read as JSON ({exc})") from None


def _field(document: Mapping, key: str, kind: type | tuple[type, ...], path: Path) -> object:
    value = document.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _corrupt(path, f"has no valid {key!r} field (found {value!r})")
    return value


def _omega_key(omega: float) -> float:
    return round(float(omega), 6)


def _cell_keys(manifest: Mapping, path: Path) -> dict[str, object]:
    model = _field(manifest, "model", dict, path)
    keys = {
        "experiment": _field(manifest, "experiment", str, path),
        "model": _field(model, "name", str, path),
        "benchmark": _field(manifest, "benchmark", str, path),
        "omega": _omega_key(_field(manifest, "omega", (int, float), path)),
        "status": _field(manifest, "status", str, path),
    }
    if keys["experiment"] != ATTENTION_EXPERIMENT:  # attention runs have no anchor level
        keys["anchor"] = _field(manifest, "anchor", str, path)
    return keys


def _keys_from_path(relative: tuple[str, ...], names: Sequence[str]) -> dict[str, object] | None:
    """Directory names as cell keys, or None when the directory is not a cell of the layout."""
    if len(relative) != len(names) + 1 or not relative[-1].startswith("omega="):
        return None
    try:
        omega = _omega_key(float(relative[-1].removeprefix("omega=")))
    except ValueError:
        return None
    return dict(zip(names, relative[:-1])) | {"omega": omega}


def _scores(results: object, benchmark: str, path: Path) -> pd.DataFrame:
    if not isinstance(results, dict):
        raise _corrupt(path, "is not a JSON object")
    if results.get("benchmark") != benchmark:
        raise _corrupt(path, f"is for benchmark {results.get('benchmark')!r}, but its manifest says {benchmark!r}")
    tasks = _field(results, "tasks", dict, path)
    if not tasks:
        raise _corrupt(path, "lists no tasks")
    columns = {column: status for column, (bench, status) in BENCHMARK_COLUMNS.items() if bench == benchmark}
    rows = {}
    for task_id, samples in tasks.items():
        if not isinstance(samples, list) or not samples or not all(isinstance(s, dict) for s in samples):
            raise _corrupt(path, f"has no sample verdicts for task {task_id!r}")
        for sample in samples:
            for status in columns.values():
                _field(sample, status, str, path)
        # Pass@1 of a task = fraction of its samples that pass (exactly 0 or 1 for greedy runs).
        rows[task_id] = [np.mean([s[status] == "pass" for s in samples]) for status in columns.values()]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(columns)).sort_index()


def _fingerprint(manifest: Mapping, results: Mapping) -> str:
    return json.dumps(
        [manifest.get("model"), manifest.get("generation"), results.get("dataset_sha256")], sort_keys=True, default=str
    )


def _attention_records(path: Path, keys: Mapping[str, object]) -> list[pd.DataFrame]:
    frames = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"cannot be read ({exc})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _corrupt(path, f"has invalid JSON on line {line_no} ({exc})") from None
        if not isinstance(record, dict):
            raise _corrupt(path, f"has a non-object on line {line_no}")
        task_id = _field(record, "task_id", str, path)
        for kind, (steps_key, share_key) in ATTENTION_KINDS.items():
            steps, shares = record.get(steps_key, []), record.get(share_key, [])
            if not isinstance(steps, list) or not isinstance(shares, list) or len(steps) != len(shares):
                raise _corrupt(path, f"has {steps_key!r} and {share_key!r} of different lengths on line {line_no}")
            if steps:
                measured = {"step": np.asarray(steps, dtype=int), "share": np.asarray(shares, dtype=float)}
                frames.append(
                    pd.DataFrame(measured).assign(
                        task_id=task_id,
                        kind=kind,
                        model=keys["model"],
                        benchmark=keys["benchmark"],
                        omega=keys["omega"],
                    )
                )
    return frames


ATTENTION_COLUMNS = ["model", "benchmark", "omega", "kind", "task_id", "step", "share"]


def load_runs(runs_dir: Path) -> Runs:
    """Every complete, evaluated cell under ``runs_dir``; the rest is listed in ``Runs.skipped``.

    Raises ``HarnessError`` for an unreadable or corrupt manifest, ``eval_results.json`` or
    ``attention.jsonl``, naming the file and the fix.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise HarnessError(
            f"Runs directory {runs_dir} does not exist. Run some cells first (e.g. `make demo`) or pass "
            f"runs_dir=<the directory holding <experiment>/<model>/<benchmark>/...>. Nothing was written."
        )
    cells: list[Cell] = []
    attention: list[pd.DataFrame] = []
    skipped: list[str] = []
    for manifest_path in sorted(runs_dir.rglob("manifest.json")):
        cell_dir = manifest_path.parent
        manifest = _read_json(manifest_path)
        if not isinstance(manifest, dict):
            raise _corrupt(manifest_path, "is not a JSON object")
        keys = _cell_keys(manifest, manifest_path)
        is_attention = keys["experiment"] == ATTENTION_EXPERIMENT
        layout = ("experiment", "model", "benchmark") + (() if is_attention else ("anchor",))
        path_keys = _keys_from_path(cell_dir.relative_to(runs_dir).parts, layout)
        if path_keys is None:
            skipped.append(f"{cell_dir}: not a cell directory of the results layout")
            continue
        if any(path_keys[name] != keys[name] for name in path_keys):
            raise _corrupt(manifest_path, f"describes cell {keys} but lies in directory {cell_dir}")
        if keys["status"] != "complete":
            skipped.append(f"{cell_dir}: status {keys['status']!r}")
            continue
        data_file = cell_dir / ("attention.jsonl" if is_attention else "eval_results.json")
        if not data_file.is_file():
            skipped.append(f"{cell_dir}: no {data_file.name}")
            continue
        if is_attention:
            attention.extend(_attention_records(data_file, keys))
            continue
        results = _read_json(data_file)
        scores = _scores(results, str(keys["benchmark"]), data_file)
        n_tasks = manifest.get("n_tasks")
        if isinstance(n_tasks, int) and n_tasks != len(scores):
            skipped.append(f"{cell_dir}: {len(scores)} of {n_tasks} tasks evaluated")
            continue
        cells.append(
            Cell(
                experiment=str(keys["experiment"]),
                model=str(keys["model"]),
                benchmark=str(keys["benchmark"]),
                anchor=str(keys["anchor"]),
                omega=float(keys["omega"]),
                path=cell_dir,
                fingerprint=_fingerprint(manifest, results),
                scores=scores,
            )
        )
    frame = pd.concat(attention, ignore_index=True) if attention else pd.DataFrame(columns=ATTENTION_COLUMNS)
    return Runs(cells=cells, attention=frame[ATTENTION_COLUMNS], skipped=skipped)


# --------------------------------------------------------------------------------------------------
# The paper's numbers


@dataclass(frozen=True)
class PaperTables:
    pass_at_1: pd.DataFrame  # index (model, benchmark column): baseline, spa, gain
    anchor_gain: pd.DataFrame  # index (anchor, benchmark column): gain (NaN where the paper prints "-")
    optimal_omega: pd.DataFrame  # index (model, benchmark column): omega; includes the "Average" rows

    def value(self, table: str, key: tuple[str, str], column: str) -> float:
        frame: pd.DataFrame = getattr(self, table)
        return float(frame.at[key, column]) if key in frame.index else math.nan


def load_paper(paper_dir: Path = PAPER_DIR) -> PaperTables:
    """The transcriptions of the paper's Tables 1-3 (``results/paper/*.csv``)."""

    def read(name: str, index: list[str]) -> pd.DataFrame:
        path = Path(paper_dir) / name
        try:
            return pd.read_csv(path, comment="#", na_values=["-"]).set_index(index)
        except (OSError, ValueError, KeyError) as exc:
            raise HarnessError(
                f"Paper table {path} cannot be read ({exc}). It is tracked in git: restore it with "
                f"`git checkout -- {path}` or pass paper_dir=<directory with the transcribed tables>."
            ) from None

    return PaperTables(
        pass_at_1=read("table1_pass_at_1.csv", ["model", "benchmark"]),
        anchor_gain=read("table2_anchor_gain.csv", ["anchor", "benchmark"]),
        optimal_omega=read("table3_optimal_omega.csv", ["model", "benchmark"]),
    )


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class GainStats:
    """A SPA-minus-baseline gain in percentage points with its paired 95% CI and p-value."""

    gain: float
    ci_low: float
    ci_high: float
    p_value: float
    n_tasks: int

    @classmethod
    def missing(cls) -> GainStats:
        return cls(math.nan, math.nan, math.nan, math.nan, 0)


def sign_test_pvalue(differences: np.ndarray) -> float:
    """Two-sided exact sign test on per-task differences.

    For greedy (0/1) outcomes the nonzero differences are McNemar's discordant pairs, so this is
    McNemar's exact test: binomial(wins; wins + losses, 1/2).
    """
    wins, losses = int(np.sum(differences > 0)), int(np.sum(differences < 0))
    return 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)


def paired_gain(differences: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> GainStats:
    """Gain, percentile paired-bootstrap CI over tasks and sign-test p-value.

    ``differences`` holds per-task SPA minus baseline pass rates, shape (tasks,) or (tasks, models);
    with several models a task is resampled for all of them at once and the gain is their mean.
    """
    per_task = np.asarray(differences, dtype=float)
    if per_task.ndim == 2:
        per_task = per_task.mean(axis=1)
    if per_task.size == 0:
        return GainStats.missing()
    rng = np.random.default_rng(seed)
    boot = per_task[rng.integers(0, per_task.size, size=(resamples, per_task.size))].mean(axis=1)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return GainStats(
        gain=100 * float(per_task.mean()),
        ci_low=100 * float(low),
        ci_high=100 * float(high),
        p_value=sign_test_pvalue(per_task),
        n_tasks=int(per_task.size),
    )


def select_omega(pass_rates: pd.Series) -> float:
    """The omega with the highest pass rate; ties go to the omega closest to 1 (the least
    intervention), then to the smaller one."""
    best = pass_rates.max()
    tied = [omega for omega, rate in pass_rates.items() if math.isclose(rate, best, rel_tol=0, abs_tol=1e-12)]
    return min(tied, key=lambda omega: (abs(omega - 1), omega))


@dataclass(frozen=True)
class OmegaSelection:
    """Omega chosen by k-fold cross-validation over tasks, scored on the held-out folds."""

    fold_omegas: tuple[float, ...]
    held_out: pd.Series  # per task: its pass rate at the omega chosen without seeing its fold

    @property
    def mean_omega(self) -> float:
        return float(np.mean(self.fold_omegas))

    @property
    def pass_at_1(self) -> float:
        return 100 * float(self.held_out.mean())


def cross_validate_omega(scores: pd.DataFrame, folds: int, seed: int) -> OmegaSelection:
    """Tune omega on k-1 folds of tasks (``select_omega``), score the held-out fold, for each fold.

    ``scores``: index task_id, one column per omega, per-task pass rates. Folds are a seeded random
    partition of the tasks (at most one fold per task).
    """
    order = np.random.default_rng(seed).permutation(len(scores))
    held_out = pd.Series(np.nan, index=scores.index)
    chosen = []
    for test in np.array_split(order, min(folds, len(scores))):
        train = np.ones(len(scores), dtype=bool)
        train[test] = False
        omega = select_omega(scores.iloc[train].mean())
        chosen.append(omega)
        held_out.iloc[test] = scores.iloc[test][omega].to_numpy()
    return OmegaSelection(fold_omegas=tuple(chosen), held_out=held_out)


# --------------------------------------------------------------------------------------------------
# Pairing cells


def _preference(settings: Settings) -> Callable[[Cell], tuple[bool, str]]:
    return lambda cell: (cell.experiment != settings.table1_experiment, cell.experiment)


def baseline_of(cell: Cell, runs: Runs) -> Cell | None:
    """The omega = 1 cell to compare ``cell`` with: same experiment, else another experiment's whose
    model, generation settings and dataset match exactly (else None: missing)."""
    candidates = runs.find(cell.model, cell.benchmark, BASELINE_ANCHOR, BASELINE_OMEGA)
    same = [c for c in candidates if c.experiment == cell.experiment]
    matching = sorted((c for c in candidates if c.fingerprint == cell.fingerprint), key=lambda c: c.experiment)
    return (same + matching or [None])[0]


@dataclass(frozen=True)
class Pair:
    spa: Cell
    baseline: Cell | None


def spa_pair(runs: Runs, model: str, benchmark: str, anchor: str, omega: float, settings: Settings) -> Pair | None:
    """The SPA cell for these keys (preferred experiment first, one with a baseline first) and its baseline."""
    candidates = sorted(runs.find(model, benchmark, anchor, omega), key=_preference(settings))
    pairs = [Pair(cell, baseline_of(cell, runs)) for cell in candidates]
    return next((p for p in pairs if p.baseline is not None), pairs[0] if pairs else None)


def _aligned(columns: Mapping[object, pd.Series]) -> pd.DataFrame:
    """Per-task scores side by side, on the tasks all of them have."""
    return pd.DataFrame(columns).dropna()


@dataclass(frozen=True)
class Sweep:
    """The omega grid of one model and benchmark (anchor NL), taken from one experiment."""

    experiment: str
    cells: dict[float, Cell]  # omega -> cell; 1.0 is the baseline

    def scores(self, column: str) -> pd.DataFrame:
        return _aligned({omega: cell.scores[column] for omega, cell in sorted(self.cells.items())})


def find_sweeps(runs: Runs, settings: Settings) -> dict[tuple[str, str], Sweep]:
    """Per (model, benchmark): the experiment with the most omegas for anchor NL (ties: preferred
    experiment, then name), plus its baseline. Grids are never merged across experiments."""
    grids: dict[tuple[str, str], list[Sweep]] = {}
    for cell in runs.cells:
        if cell.anchor != SPA_ANCHOR or math.isclose(cell.omega, BASELINE_OMEGA):
            continue
        group = grids.setdefault((cell.model, cell.benchmark), [])
        sweep = next((s for s in group if s.experiment == cell.experiment), None)
        if sweep is None:
            sweep = Sweep(cell.experiment, {})
            group.append(sweep)
            baseline = baseline_of(cell, runs)
            if baseline is not None:
                sweep.cells[BASELINE_OMEGA] = baseline
        sweep.cells[cell.omega] = cell
    return {
        key: min(group, key=lambda s: (-len(s.cells), s.experiment != settings.table1_experiment, s.experiment))
        for key, group in grids.items()
    }


def model_order(models: Iterable[str]) -> list[str]:
    """The paper's models in its order, then the demo model, then any other model by name."""
    present = set(models)
    known = [m for m in MODEL_NAMES if m in present]
    return known + sorted(present - set(known))


def display_name(model: str) -> str:
    return MODEL_NAMES.get(model, model)


# --------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Context:
    runs: Runs
    paper: PaperTables
    settings: Settings
    sweeps: dict[tuple[str, str], Sweep]

    @property
    def models(self) -> list[str]:
        paper_models = [m for m, _ in self.paper.pass_at_1.index]
        return model_order([*paper_models, *(c.model for c in self.runs.cells)])

    def stats(self, differences: np.ndarray) -> GainStats:
        return paired_gain(differences, self.settings.bootstrap_resamples, self.settings.seed)


def spa_omega(ctx: Context, model: str, column: str) -> tuple[float, str]:
    """The omega Table 1 (and Table 2) uses, and where it comes from.

    The paper's Table 3 value for its models; otherwise the single omega the preferred (table1)
    experiment ran; otherwise the test-set argmax over the omegas that exist (optimistic, labelled so).
    """
    paper_omega = ctx.paper.value("optimal_omega", (model, column), "omega")
    if not math.isnan(paper_omega):
        return paper_omega, "paper Table 3"
    benchmark = BENCHMARK_COLUMNS[column][0]
    experiment = ctx.settings.table1_experiment
    ran = {
        c.omega: c.scores[column].mean()
        for c in ctx.runs.cells
        if (c.experiment, c.model, c.benchmark, c.anchor) == (experiment, model, benchmark, SPA_ANCHOR)
        and not math.isclose(c.omega, BASELINE_OMEGA)
    }
    if len(ran) == 1:
        return next(iter(ran)), f"{experiment} run"
    if not ran and (model, benchmark) in ctx.sweeps:
        sweep_scores = ctx.sweeps[(model, benchmark)].scores(column)
        ran = sweep_scores.drop(columns=BASELINE_OMEGA, errors="ignore").mean().to_dict()
    if ran:
        return select_omega(pd.Series(ran)), "test-set argmax (optimistic)"
    return math.nan, "no SPA run"


def paired_scores(ctx: Context, model: str, column: str, anchor: str, omega: float) -> pd.DataFrame:
    """Per-task ``baseline`` and ``spa`` pass rates on the tasks both cells have; a missing cell is
    a NaN column (the frame is empty when neither exists)."""
    benchmark = BENCHMARK_COLUMNS[column][0]
    pair = None if math.isnan(omega) else spa_pair(ctx.runs, model, benchmark, anchor, omega, ctx.settings)
    if pair is None:
        baselines = ctx.runs.find(model, benchmark, BASELINE_ANCHOR, BASELINE_OMEGA)
        if baselines:  # show the plain model's Pass@1 even without an SPA cell to compare
            baselines.sort(key=_preference(ctx.settings))
            return pd.DataFrame({"baseline": baselines[0].scores[column], "spa": math.nan})
        return pd.DataFrame(columns=["baseline", "spa"], dtype=float)
    if pair.baseline is None:
        return pd.DataFrame({"baseline": math.nan, "spa": pair.spa.scores[column]})
    return _aligned({"baseline": pair.baseline.scores[column], "spa": pair.spa.scores[column]})


def _is_paired(scores: pd.DataFrame) -> bool:
    return not scores.empty and bool(scores.notna().all().all())


def _cv_row(ctx: Context, model: str, column: str) -> dict[str, object]:
    """Cross-validated omega and its held-out Pass@1 and gain (NaN without a sweep of >= 2 omegas)."""
    sweep = ctx.sweeps.get((model, BENCHMARK_COLUMNS[column][0]))
    scores = sweep.scores(column) if sweep else pd.DataFrame()
    row: dict[str, object] = {
        "sweep_experiment": sweep.experiment if sweep else None,
        "sweep_omegas": " ".join(f"{w:g}" for w in scores.columns),
    }
    if scores.shape[1] < 2 or scores.empty:
        no_cv = {"cv_omega": math.nan, "cv_fold_omegas": "", "cv_spa": math.nan}
        return row | no_cv | _gain_row("cv_", GainStats.missing())
    selection = cross_validate_omega(scores, ctx.settings.cv_folds, ctx.settings.seed)
    cv_gain = GainStats.missing()
    if BASELINE_OMEGA in scores.columns:
        cv_gain = ctx.stats((selection.held_out - scores[BASELINE_OMEGA]).to_numpy())
    return row | {
        "cv_omega": selection.mean_omega,
        "cv_fold_omegas": " ".join(f"{w:g}" for w in selection.fold_omegas),
        "cv_spa": selection.pass_at_1,
    } | _gain_row("cv_", cv_gain)


def _gain_row(prefix: str, stats: GainStats) -> dict[str, float]:
    return {
        f"{prefix}gain": stats.gain,
        f"{prefix}gain_ci_low": stats.ci_low,
        f"{prefix}gain_ci_high": stats.ci_high,
        f"{prefix}p_value": stats.p_value,
    }


def build_table1(ctx: Context) -> pd.DataFrame:
    """Per model and benchmark column: baseline and SPA Pass@1 (anchor NL), gain with CI and
    p-value, the paper's numbers, and the cross-validated omega's held-out result."""
    rows = []
    for model in ctx.models:
        for column in BENCHMARK_COLUMNS:
            omega, source = spa_omega(ctx, model, column)
            pairs = paired_scores(ctx, model, column, SPA_ANCHOR, omega)
            stats = ctx.stats((pairs.spa - pairs.baseline).to_numpy()) if _is_paired(pairs) else GainStats.missing()
            paper_key = (model, column)
            rows.append(
                {
                    "model": display_name(model),
                    "model_key": model,
                    "benchmark": column,
                    "omega": omega,
                    "omega_source": source,
                    "n_tasks": len(pairs) or math.nan,
                    "baseline": 100 * pairs.baseline.mean(),  # NaN for a missing cell
                    "spa": 100 * pairs.spa.mean(),
                    **_gain_row("", stats),
                    "paper_baseline": ctx.paper.value("pass_at_1", paper_key, "baseline"),
                    "paper_spa": ctx.paper.value("pass_at_1", paper_key, "spa"),
                    "paper_gain": ctx.paper.value("pass_at_1", paper_key, "gain"),
                    **_cv_row(ctx, model, column),
                }
            )
    return pd.DataFrame(rows)


def build_table2(ctx: Context) -> pd.DataFrame:
    """Mean gain over models per anchored text and benchmark column (each model at its Table 1
    omega), with a CI and p-value that resample tasks jointly for all models."""
    rows = []
    for anchor, anchor_name in TABLE2_ANCHORS.items():
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            applicable = (anchor, benchmark) not in NOT_APPLICABLE
            differences = {}
            for model in ctx.models if applicable else []:
                pairs = paired_scores(ctx, model, column, anchor, spa_omega(ctx, model, column)[0])
                if _is_paired(pairs):
                    differences[model] = pairs.spa - pairs.baseline
            stats = ctx.stats(_aligned(differences).to_numpy()) if differences else GainStats.missing()
            rows.append(
                {
                    "anchor": anchor_name,
                    "anchor_key": anchor,
                    "benchmark": column,
                    "applicable": applicable,
                    "n_models": len(differences),
                    "models": ", ".join(display_name(m) for m in differences),
                    "n_tasks": stats.n_tasks or math.nan,
                    **_gain_row("", stats),
                    "paper_gain": ctx.paper.value("anchor_gain", (anchor, column), "gain"),
                }
            )
    return pd.DataFrame(rows)


def build_table3(ctx: Context) -> pd.DataFrame:
    """Per model and benchmark column: test-set-optimal omega over the sweep, the cross-validated
    omega with its held-out Pass@1, and the paper's (test-set-optimal) omega."""
    rows = []
    for model in ctx.models:
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            sweep = ctx.sweeps.get((model, benchmark))
            scores = sweep.scores(column) if sweep else pd.DataFrame()
            pass_rates = 100 * scores.mean() if not scores.empty else pd.Series(dtype=float)
            best = select_omega(pass_rates) if len(pass_rates) else math.nan
            rows.append(
                {
                    "model": display_name(model),
                    "model_key": model,
                    "benchmark": column,
                    "n_tasks": len(scores) or math.nan,
                    "baseline": pass_rates.get(BASELINE_OMEGA, math.nan),
                    "test_optimal_omega": best,
                    "test_optimal_spa": pass_rates.get(best, math.nan),
                    **_cv_row(ctx, model, column),
                    "paper_omega": ctx.paper.value("optimal_omega", (model, column), "omega"),
                }
            )
    return pd.DataFrame(rows)


def build_figure4_data(ctx: Context) -> pd.DataFrame:
    """Pass@1 per model, benchmark column and omega of each sweep; the paper's Pass@1 where its
    Table 1 gives one (omega = 1 and the paper's optimal omega; Figure 4 itself is only a plot)."""
    rows = []
    for model in ctx.models:
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            sweep = ctx.sweeps.get((model, benchmark))
            if sweep is None:
                continue
            scores = sweep.scores(column)
            paper_omega = ctx.paper.value("optimal_omega", (model, column), "omega")
            for omega in scores.columns:
                # The paper prints Pass@1 only at omega = 1 (baseline) and its optimal omega (SPA).
                paper_value = math.nan
                if math.isclose(omega, BASELINE_OMEGA) or math.isclose(omega, paper_omega):
                    paper_column = "baseline" if math.isclose(omega, BASELINE_OMEGA) else "spa"
                    paper_value = ctx.paper.value("pass_at_1", (model, column), paper_column)
                rows.append(
                    {
                        "model": display_name(model),
                        "model_key": model,
                        "benchmark": column,
                        "omega": omega,
                        "experiment": sweep.experiment,
                        "n_tasks": len(scores),
                        "pass_at_1": 100 * scores[omega].mean(),
                        "paper_pass_at_1": paper_value,
                    }
                )
    columns = ["model", "model_key", "benchmark", "omega", "experiment", "n_tasks", "pass_at_1", "paper_pass_at_1"]
    return pd.DataFrame(rows, columns=columns)


def attention_curves(attention: pd.DataFrame, max_step: int) -> pd.DataFrame:
    """Mean % of attention on the prompt per generated-token step over the tasks still generating,
    with a 95% normal-approximation band (NaN where fewer than 2 tasks remain) and that count."""
    keys = ["model", "benchmark", "omega", "kind", "step"]
    data = attention[attention["step"] < max_step]
    if data.empty:
        return pd.DataFrame(columns=[*keys, "mean", "low", "high", "n"])
    grouped = data.groupby(keys)["share"].agg(["mean", "std", "count"]).reset_index()
    half_width = 1.96 * grouped["std"] / np.sqrt(grouped["count"])
    return grouped.assign(
        mean=100 * grouped["mean"],
        low=(100 * (grouped["mean"] - half_width)).clip(0, 100),
        high=(100 * (grouped["mean"] + half_width)).clip(0, 100),
        n=grouped["count"],
    )[[*keys, "mean", "low", "high", "n"]]


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Show:
    """One displayed column: a header and how to render it from a row (``missing``: the mark for no data)."""

    header: str
    render: Callable[[pd.Series, str], str]
    numeric: bool = True


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def text(header: str, column: str) -> Show:
    return Show(header, lambda row, missing: missing if _missing(row[column]) else str(row[column]), numeric=False)


def number(header: str, column: str, spec: str) -> Show:
    return Show(header, lambda row, missing: missing if _missing(row[column]) else format(row[column], spec))


def gain_with_ci(header: str, prefix: str = "") -> Show:
    def render(row: pd.Series, missing: str) -> str:
        gain, low, high = (row[f"{prefix}gain{part}"] for part in ("", "_ci_low", "_ci_high"))
        if _missing(gain):
            return missing
        return f"{gain:+.1f} [{low:+.1f}, {high:+.1f}]"

    return Show(header, render)


def display_frame(frame: pd.DataFrame, shows: Sequence[Show], missing: str) -> pd.DataFrame:
    """The table as text; rows with ``applicable == False`` show "n/a" instead of numbers."""
    rows = []
    for _, row in frame.iterrows():
        not_applicable = not row.get("applicable", True)
        rows.append([NOT_APPLICABLE_MARK if not_applicable and s.numeric else s.render(row, missing) for s in shows])
    return pd.DataFrame(rows, columns=[s.header for s in shows])


def to_markdown(table: pd.DataFrame) -> str:
    """A padded GitHub-flavoured Markdown table of a text frame (no ``tabulate`` needed)."""
    cells = [list(table.columns)] + table.astype(str).values.tolist()
    cells = [[value.replace("|", "\\|") for value in row] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    lines = ["| " + " | ".join(value.ljust(w) for value, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` float of a text frame; cells, headers and caption escaped."""
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    caption = "".join(LATEX_SPECIALS.get(char, char) for char in caption)
    return styler.to_latex(hrules=True, caption=caption, label=label, position_float="centering")


@dataclass(frozen=True)
class TableSpec:
    name: str  # file stem under tables/
    title: str
    shows: tuple[Show, ...]


def table_files(frame: pd.DataFrame, spec: TableSpec, tables_dir: Path) -> tuple[dict[Path, bytes], str]:
    """``<name>.csv`` (every column, full precision, NaN for no data), ``.md`` and ``.tex`` (the
    displayed columns), and the Markdown text to print."""
    markdown = to_markdown(display_frame(frame, spec.shows, MISSING_MARK["md"]))
    latex = to_latex(display_frame(frame, spec.shows, MISSING_MARK["tex"]), spec.title, f"tab:{spec.name}")
    files = {
        tables_dir / f"{spec.name}.csv": frame.to_csv(index=False, na_rep="NaN").encode(),
        tables_dir / f"{spec.name}.md": f"**{spec.title}**\n\n{markdown}".encode(),
        tables_dir / f"{spec.name}.tex": latex.encode(),
    }
    return files, f"{spec.title}\n\n{markdown}"


TABLE1 = TableSpec(
    "table1",
    f"Table 1: Pass@1 (%) without and with SPA (anchor NL), ours vs {PAPER} Table 1",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        number("omega", "omega", "g"),
        number("Tasks", "n_tasks", ".0f"),
        number("Baseline", "baseline", ".1f"),
        number("SPA", "spa", ".1f"),
        gain_with_ci("Gain [95% CI]"),
        number("p (McNemar)", "p_value", ".3g"),
        number("Paper baseline", "paper_baseline", ".1f"),
        number("Paper SPA", "paper_spa", ".1f"),
        number("Paper gain", "paper_gain", "+.1f"),
        number("CV omega", "cv_omega", ".3g"),
        number("CV SPA", "cv_spa", ".1f"),
        gain_with_ci("CV gain [95% CI]", "cv_"),
    ),
)
TABLE2 = TableSpec(
    "table2",
    f"Table 2: mean Pass@1 gain (points) per anchored text, ours vs {PAPER} Table 2",
    (
        text("Anchored text", "anchor"),
        text("Benchmark", "benchmark"),
        number("Models", "n_models", "d"),
        gain_with_ci("Mean gain [95% CI]"),
        number("p (sign test)", "p_value", ".3g"),
        number("Paper gain", "paper_gain", "+.2f"),
    ),
)
TABLE3 = TableSpec(
    "table3",
    f"Table 3: optimal omega, ours (test-set argmax and {{k}}-fold CV) vs {PAPER} Table 3",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        text("Omegas run", "sweep_omegas"),
        number("Baseline", "baseline", ".1f"),
        number("Test-optimal omega", "test_optimal_omega", "g"),
        number("Its Pass@1", "test_optimal_spa", ".1f"),
        text("CV omega per fold", "cv_fold_omegas"),
        number("CV held-out Pass@1", "cv_spa", ".1f"),
        gain_with_ci("CV gain [95% CI]", "cv_"),
        number("Paper omega", "paper_omega", "g"),
    ),
)
FIGURE4 = TableSpec(
    "figure4_omega",
    f"Figure 4 data: Pass@1 (%) per omega (anchor NL); paper values from {PAPER} Table 1 where it gives them",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        number("omega", "omega", "g"),
        number("Tasks", "n_tasks", ".0f"),
        number("Pass@1", "pass_at_1", ".1f"),
        number("Paper Pass@1", "paper_pass_at_1", ".1f"),
    ),
)


# --------------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class Outputs:
    files: dict[Path, bytes] = field(default_factory=dict)  # everything to write, computed up front
    printed: list[str] = field(default_factory=list)  # for stdout: the tables beside the paper's
    notes: list[str] = field(default_factory=list)  # for stderr: skipped cells and figures


def _model_colors(models: Sequence[str]) -> dict[str, str]:
    return {display_name(m): f"C{i % 10}" for i, m in enumerate(models)}


def _figure_files(
    name: str, figure: figures.Figure | None, figures_dir: Path, outputs: Outputs, why_empty: str
) -> None:
    """Queue ``name``.png/.pdf, or a note saying why there is no figure (and which older files remain)."""
    if figure is None:
        stale = [str(p) for p in (figures_dir / f"{name}.png", figures_dir / f"{name}.pdf") if p.exists()]
        left = f" (older files left as they were: {', '.join(stale)})" if stale else ""
        outputs.notes.append(f"{name} skipped: {why_empty}{left}")
        return
    for extension, data in figures.render(figure).items():
        outputs.files[figures_dir / f"{name}.{extension}"] = data


def _attention_figures(ctx: Context, figures_dir: Path, tables_dir: Path, outputs: Outputs) -> None:
    settings = ctx.settings
    curves = attention_curves(ctx.runs.attention, settings.max_step)
    curves = curves[curves["benchmark"] == settings.attention_benchmark]
    why = f"no complete attention runs for benchmark {settings.attention_benchmark!r} under {ATTENTION_EXPERIMENT}/"
    if not curves.empty:
        outputs.files[tables_dir / "attention_curves.csv"] = curves.to_csv(index=False, na_rep="NaN").encode()
    models = model_order(curves["model"])
    colors = _model_colors(ctx.models)
    curves = curves.assign(label=curves["model"].map(display_name))
    plain = curves[np.isclose(curves["omega"].astype(float), BASELINE_OMEGA)]
    labels = [display_name(m) for m in models]
    for name, kind, title in (
        ("figure2_self_attention", "self", "Self-attention on the prompt (last layer), ω = 1"),
        ("figure3_gradient_attention", "gradient", "Gradient-based attention on the prompt, ω = 1"),
    ):
        data = plain[plain["kind"] == kind]
        figure = None if data.empty else figures.attention_figure(data, labels, colors, title, settings.max_step)
        _figure_files(name, figure, figures_dir, outputs, why + f" with {kind} attention at omega = 1")
    with_spa = curves.groupby("model")["omega"].transform("nunique") > 1
    compared = curves[with_spa]
    compared_labels = [display_name(m) for m in models if m in set(compared["model"])]
    figure = None if compared.empty else figures.spa_vs_plain_figure(compared, compared_labels, settings.max_step)
    _figure_files("attention_spa_vs_plain", figure, figures_dir, outputs, why + " at both omega = 1 and an SPA omega")


def aggregate(
    runs_dir: Path,
    out_dir: Path,
    what: str = "all",
    settings: Settings = Settings(),
    paper_dir: Path = PAPER_DIR,
) -> Outputs:
    """Compute every table and figure for ``what`` ("all", "tables" or "figures") without writing."""
    if what not in ("all", "tables", "figures"):
        raise ConfigError(f"what={what!r} is invalid: choose all, tables or figures.")
    runs = load_runs(runs_dir)
    ctx = Context(runs, load_paper(paper_dir), settings, find_sweeps(runs, settings))
    outputs = Outputs(notes=[f"cell not counted (shown as missing): {s}" for s in runs.skipped])
    tables_dir, figures_dir = Path(out_dir) / "tables", Path(out_dir) / "figures"
    figure4 = build_figure4_data(ctx)
    if what in ("all", "tables"):
        table3 = replace(TABLE3, title=TABLE3.title.format(k=settings.cv_folds))
        for frame, spec in (
            (build_table1(ctx), TABLE1),
            (build_table2(ctx), TABLE2),
            (build_table3(ctx), table3),
            (figure4, FIGURE4),
        ):
            files, printed = table_files(frame, spec, tables_dir)
            outputs.files.update(files)
            outputs.printed.append(printed)
    if what in ("all", "figures"):
        figure = None
        if not figure4.empty:
            figure = figures.omega_sweep_figure(figure4, list(BENCHMARK_COLUMNS), _model_colors(ctx.models))
        _figure_files("figure4_omega", figure, figures_dir, outputs, "no anchor-NL runs at omega != 1")
        _attention_figures(ctx, figures_dir, tables_dir, outputs)
    outputs.files[Path(out_dir) / "provenance.json"] = _provenance(runs, runs_dir, settings)
    return outputs


def _provenance(runs: Runs, runs_dir: Path, settings: Settings) -> bytes:
    """What the tables and figures were built from: the aggregator's code and every cell it read."""
    from eval.store import git_commit, package_versions

    cells = [
        {"path": str(c.path.relative_to(runs_dir)), "experiment": c.experiment, "model": c.model, "benchmark": c.benchmark,
         "anchor": c.anchor, "omega": c.omega, "fingerprint": c.fingerprint}
        for c in sorted(runs.cells, key=lambda c: str(c.path))
    ]
    record = {"runs_dir": str(runs_dir), "settings": asdict(settings), "git": git_commit(), "packages": package_versions(),
              "cells": cells, "not_counted": runs.skipped}
    return json.dumps(record, indent=2).encode()


def write_outputs(files: Mapping[Path, bytes]) -> None:
    """Write each file to a temporary sibling, then rename it over the target (atomic per file)."""
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

