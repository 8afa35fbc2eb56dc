"""Aggregation of finished runs into the paper's Tables 1-3 and Figures 2-4, with statistics.

Reads ``results/runs`` (layout in docs/aggregation.md), pairs every SPA cell with its omega = 1
baseline of the same protocol and puts the result next to the paper's numbers
(``results/paper/*.csv``). Results of different protocols (``evalplus``, ``authors``) never share a
number: every row names its protocol, and pairing, baselines and omega sweeps stay within one.
Beyond the paper it reports, for every SPA-minus-baseline gain, a paired-bootstrap 95% CI over
tasks and an exact McNemar p-value, and an omega chosen honestly by k-fold cross-validation over
tasks next to the test-set-optimal omega the paper reports. As in the paper, one omega is chosen
per dataset pair (HumanEval with HumanEval+, MBPP with MBPP+). Cells of the other methods (CFG, CAD:
``eval.methods``) feed the method comparison, each method's strength chosen by the same cross-validation.

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
from eval.methods import METHODS, SPA
from eval.store import cell_levels

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_DIR = REPO_ROOT / "results" / "paper"
# The paper text transcribed in results/paper/ (../shared/paper/selective-prompt-anchoring.txt): the
# arXiv:2408.09121 version with five models and four benchmarks ("up to 9.7%"); it names no venue.
PAPER = "Tian & Zhang (arXiv:2408.09121, 5-model version)"

# Table column -> (benchmark whose runs hold it, per-sample status that decides a pass).
# A plus pass already requires the base tests to pass; the evaluator's plus_status is used as given.
BENCHMARK_COLUMNS: dict[str, tuple[str, str]] = {
    "HumanEval": ("humaneval", "base_status"),
    "HumanEval+": ("humaneval", "plus_status"),
    "MBPP": ("mbpp", "base_status"),
    "MBPP+": ("mbpp", "plus_status"),
}

# One omega per dataset pair, as the paper's Table 3 (the run benchmark holds both columns of its pair).
DATASET_PAIRS: dict[str, tuple[str, str]] = {"humaneval": ("HumanEval", "HumanEval+"), "mbpp": ("MBPP", "MBPP+")}

# Protocols in display order (eval/benchmarks/protocols.py); any other protocol follows by name.
PROTOCOL_ORDER: tuple[str, ...] = ("evalplus", "authors")

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
# The rows of the method comparison, in order: (method, anchor of its cells, what its second view is). CFG's
# last-token negative ignores the anchors, so its cells have anchor "none" (eval/methods.py).
METHOD_VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("spa", SPA_ANCHOR, "NL masked"),
    ("cfg", BASELINE_ANCHOR, "last prompt token"),
    ("cfg", SPA_ANCHOR, "NL masked"),
    ("cad", SPA_ANCHOR, "NL deleted"),
    ("pasta", SPA_ANCHOR, "NL emphasized"),  # one view; its weight is alpha (attention kept outside the NL)
)
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
    protocol: str
    anchor: str
    omega: float  # the weight on the full prompt: SPA's omega, CFG's guidance_scale, 1 + CAD's alpha (PASTA: its alpha); 1 = plain model
    path: Path
    fingerprint: str  # protocol, model, generation settings, dataset hash: equal ones may share a baseline
    scores: pd.DataFrame  # index task_id; the benchmark's two table columns; per-task pass rate in [0, 1]
    method: str = "spa"  # eval.methods: spa, cfg, cad, pasta
    strength: float = math.nan  # the method's own strength (its directory leaf): omega, guidance_scale or alpha


@dataclass
class Runs:
    cells: list[Cell]
    attention: pd.DataFrame  # protocol, model, benchmark, omega, kind, task_id, step, share
    skipped: list[str] = field(default_factory=list)  # "path: reason" for cells that do not count

    def find(self, model: str, benchmark: str, protocol: str | None, anchor: str, omega: float, method: str = "spa") -> list[Cell]:
        return [
            c
            for c in self.cells
            if (c.model, c.benchmark, c.protocol, c.anchor, c.method) == (model, benchmark, protocol, anchor, method)
            and math.isclose(c.omega, omega)
        ]

    @property
    def protocols(self) -> list[str]:
        return protocol_order(c.protocol for c in self.cells)


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
    """The cell's keys from its manifest (``protocol`` is None for a manifest written before protocols; a
    manifest without ``method``, written before other methods existed, is SPA's)."""
    model = _field(manifest, "model", dict, path)
    keys = {
        "experiment": _field(manifest, "experiment", str, path),
        "model": _field(model, "name", str, path),
        "benchmark": _field(manifest, "benchmark", str, path),
        "protocol": None if "protocol" not in manifest else _field(manifest, "protocol", str, path),
        "omega": _omega_key(_field(manifest, "omega", (int, float), path)),
        "status": _field(manifest, "status", str, path),
        "method": SPA.name,
    }
    keys["strength"] = keys["omega"]
    if "method" in manifest:
        method = _field(manifest, "method", dict, path)
        name = _field(method, "name", str, path)
        if name not in METHODS:
            raise _corrupt(path, f"names method {name!r}, which this harness does not know ({', '.join(METHODS)})")
        keys["method"] = name
        keys["strength"] = _omega_key(_field(method, METHODS[name].parameter, (int, float), path))
    if keys["experiment"] != ATTENTION_EXPERIMENT:  # attention runs have no anchor level
        keys["anchor"] = _field(manifest, "anchor", str, path)
    return keys


def _keys_from_path(relative: tuple[str, ...], names: Sequence[str], parameter: str = "omega") -> dict[str, object] | None:
    """Directory names as cell keys (the leaf ``<parameter>=<value>`` as ``strength``), or None when the
    directory is not a cell of the layout."""
    if len(relative) != len(names) + 1 or not relative[-1].startswith(f"{parameter}="):
        return None
    try:
        strength = _omega_key(float(relative[-1].removeprefix(f"{parameter}=")))
    except ValueError:
        return None
    return dict(zip(names, relative[:-1])) | {"strength": strength}


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
    """What must be equal for two experiments to share an omega = 1 baseline: protocol (name and
    settings), model, generation settings and dataset hash."""
    return json.dumps(
        [
            manifest.get("protocol"),
            manifest.get("protocol_settings"),
            manifest.get("model"),
            manifest.get("generation"),
            results.get("dataset_sha256"),
        ],
        sort_keys=True,
        default=str,
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
                        protocol=keys["protocol"],
                        model=keys["model"],
                        benchmark=keys["benchmark"],
                        omega=keys["omega"],
                    )
                )
    return frames


ATTENTION_COLUMNS = ["protocol", "model", "benchmark", "omega", "kind", "task_id", "step", "share"]


def load_runs(runs_dir: Path) -> Runs:
    """Every complete, evaluated cell under ``runs_dir``; the rest is listed in ``Runs.skipped``.

    Raises ``HarnessError`` for an unreadable or corrupt manifest, ``eval_results.json`` or
    ``attention.jsonl``, naming the file and the fix.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise HarnessError(
            f"Runs directory {runs_dir} does not exist. Run some cells first (e.g. `make demo`) or pass "
            f"runs_dir=<the directory holding <experiment>/<model>/<benchmark>/<protocol>/...>. Nothing was written."
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
        if keys["protocol"] is None:
            skipped.append(
                f"{cell_dir}: its manifest names no protocol (a run from before protocols existed, in the old "
                f"layout without a <protocol>/ level); rerun the cell to count it"
            )
            continue
        is_attention = keys["experiment"] == ATTENTION_EXPERIMENT
        layout = cell_levels(str(keys["method"]), attention=is_attention)
        path_keys = _keys_from_path(cell_dir.relative_to(runs_dir).parts, layout, METHODS[str(keys["method"])].parameter)
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
                protocol=str(keys["protocol"]),
                anchor=str(keys["anchor"]),
                omega=float(keys["omega"]),
                path=cell_dir,
                fingerprint=_fingerprint(manifest, results),
                scores=scores,
                method=str(keys["method"]),
                strength=float(keys["strength"]),
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
    held_out: pd.Series  # per task: its score (on the selection scores) at the omega chosen without its fold
    fold_tasks: tuple[tuple[object, ...], ...] = ()  # the task ids of each fold, in fold order

    @property
    def n_folds(self) -> int:
        """Folds actually used: ``min(k, number of tasks)``."""
        return len(self.fold_omegas)

    @property
    def mean_omega(self) -> float:
        return float(np.mean(self.fold_omegas))

    @property
    def pass_at_1(self) -> float:
        return 100 * float(self.held_out.mean())

    def held_out_of(self, scores: pd.DataFrame) -> pd.Series:
        """Per task of ``scores`` (same tasks and omegas as the selection's): its pass rate at the omega
        its fold was given. Lets one pair-level choice be scored on each column of the pair."""
        held_out = pd.Series(np.nan, index=scores.index)
        for tasks, omega in zip(self.fold_tasks, self.fold_omegas):
            held_out.loc[list(tasks)] = scores.loc[list(tasks), omega].to_numpy()
        return held_out


def cross_validate_omega(scores: pd.DataFrame, folds: int, seed: int) -> OmegaSelection:
    """Tune omega on k-1 folds of tasks (``select_omega``), score the held-out fold, for each fold.

    ``scores``: index task_id, one column per omega, per-task scores (pass rates, or for a dataset
    pair the mean of the base and plus pass rates). Folds are a seeded random partition of the
    tasks; with fewer tasks than ``folds`` each task is its own fold (``n_folds`` says how many).
    """
    order = np.random.default_rng(seed).permutation(len(scores))
    held_out = pd.Series(np.nan, index=scores.index)
    chosen, fold_tasks = [], []
    for test in np.array_split(order, min(folds, len(scores))):
        train = np.ones(len(scores), dtype=bool)
        train[test] = False
        omega = select_omega(scores.iloc[train].mean())
        chosen.append(omega)
        fold_tasks.append(tuple(scores.index[test]))
        held_out.iloc[test] = scores.iloc[test][omega].to_numpy()
    return OmegaSelection(fold_omegas=tuple(chosen), held_out=held_out, fold_tasks=tuple(fold_tasks))


# --------------------------------------------------------------------------------------------------
# Pairing cells


def _preference(settings: Settings) -> Callable[[Cell], tuple[bool, str]]:
    return lambda cell: (cell.experiment != settings.table1_experiment, cell.experiment)


def baseline_of(cell: Cell, runs: Runs) -> Cell | None:
    """The omega = 1 cell to compare ``cell`` with, always of the same protocol: same experiment,
    else another experiment's whose protocol settings, model, generation settings and dataset match
    exactly (else None: missing)."""
    candidates = runs.find(cell.model, cell.benchmark, cell.protocol, BASELINE_ANCHOR, BASELINE_OMEGA)
    same = [c for c in candidates if c.experiment == cell.experiment]
    matching = sorted((c for c in candidates if c.fingerprint == cell.fingerprint), key=lambda c: c.experiment)
    return (same + matching or [None])[0]


@dataclass(frozen=True)
class Pair:
    spa: Cell
    baseline: Cell | None


def spa_pair(
    runs: Runs, model: str, benchmark: str, protocol: str | None, anchor: str, omega: float, settings: Settings
) -> Pair | None:
    """The SPA cell for these keys (preferred experiment first, one with a baseline first) and its baseline."""
    candidates = sorted(runs.find(model, benchmark, protocol, anchor, omega), key=_preference(settings))
    pairs = [Pair(cell, baseline_of(cell, runs)) for cell in candidates]
    return next((p for p in pairs if p.baseline is not None), pairs[0] if pairs else None)


def _aligned(columns: Mapping[object, pd.Series]) -> pd.DataFrame:
    """Per-task scores side by side, on the tasks all of them have."""
    return pd.DataFrame(columns).dropna()


@dataclass(frozen=True)
class Sweep:
    """The strength grid of one model, benchmark, protocol and method variant (SPA: anchor NL), taken from one
    experiment, keyed by the weight on the full prompt (``Cell.omega``), so that every method's plain model is 1."""

    experiment: str
    cells: dict[float, Cell]  # omega -> cell; 1.0 is the baseline

    def scores(self, column: str) -> pd.DataFrame:
        return _aligned({omega: cell.scores[column] for omega, cell in sorted(self.cells.items())})

    def pair_scores(self) -> pd.DataFrame:
        """Per task and omega: the mean of its base and plus pass rates (the dataset pair's score)."""
        return _aligned({omega: cell.scores.mean(axis=1) for omega, cell in sorted(self.cells.items())})


SweepKey = tuple[str, str, str, str, str]  # model, benchmark, protocol, method, anchor


def find_sweeps(runs: Runs, settings: Settings) -> dict[SweepKey, Sweep]:
    """Per (model, benchmark, protocol, method, anchor) of ``METHOD_VARIANTS`` (SPA: anchor NL): the experiment
    with the most strengths (ties: preferred experiment, then name), plus its baseline (same protocol). Grids
    are never merged across experiments, protocols or methods."""
    variants = {(method, anchor) for method, anchor, _ in METHOD_VARIANTS}
    grids: dict[SweepKey, list[Sweep]] = {}
    for cell in runs.cells:
        if (cell.method, cell.anchor) not in variants or math.isclose(cell.omega, BASELINE_OMEGA):
            continue
        group = grids.setdefault((cell.model, cell.benchmark, cell.protocol, cell.method, cell.anchor), [])
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


def protocol_order(protocols: Iterable[str | None]) -> list[str]:
    """The protocols present, in ``PROTOCOL_ORDER`` first, then any other by name."""
    present = {p for p in protocols if isinstance(p, str)}
    known = [p for p in PROTOCOL_ORDER if p in present]
    return known + sorted(present - set(known))


# --------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Context:
    runs: Runs
    paper: PaperTables
    settings: Settings
    sweeps: dict[SweepKey, Sweep]

    @property
    def models(self) -> list[str]:
        paper_models = [m for m, _ in self.paper.pass_at_1.index]
        return model_order([*paper_models, *(c.model for c in self.runs.cells)])

    @property
    def protocols(self) -> list[str | None]:
        """Protocols with any cell; ``[None]`` (one row, protocol missing) when nothing was run."""
        return self.runs.protocols or [None]

    def model_protocols(self, model: str) -> list[str | None]:
        """The protocols a model has cells of; ``[None]`` for a model with no runs (its row still
        carries the paper's numbers)."""
        return protocol_order(c.protocol for c in self.runs.cells if c.model == model) or [None]

    def stats(self, differences: np.ndarray) -> GainStats:
        return paired_gain(differences, self.settings.bootstrap_resamples, self.settings.seed)

    def sweep(self, model: str, benchmark: str, protocol: str | None, method: str = "spa", anchor: str = SPA_ANCHOR) -> Sweep | None:
        """The strength grid of a method variant (default: SPA, anchor NL)."""
        return self.sweeps.get((model, benchmark, protocol, method, anchor))


def paper_pair_omega(ctx: Context, model: str, benchmark: str) -> float:
    """The paper's Table 3 omega for a dataset pair (it prints one value for both columns of a pair)."""
    for column in DATASET_PAIRS[benchmark]:
        omega = ctx.paper.value("optimal_omega", (model, column), "omega")
        if not math.isnan(omega):
            return omega
    return math.nan


def spa_omega(ctx: Context, model: str, benchmark: str, protocol: str | None) -> tuple[float, str]:
    """The omega Table 1 (and Table 2) uses for a dataset pair under one protocol, and where it comes from.

    The paper's Table 3 value for its models; otherwise the single omega the preferred (table1)
    experiment ran; otherwise the test-set argmax of the pair score (mean of base and plus Pass@1)
    over the omegas that exist (optimistic, labelled so). HumanEval and HumanEval+ (MBPP and MBPP+)
    therefore always share an omega.
    """
    paper_omega = paper_pair_omega(ctx, model, benchmark)
    if not math.isnan(paper_omega):
        return paper_omega, "paper Table 3"
    experiment = ctx.settings.table1_experiment
    ran = {
        c.omega: float(c.scores.mean(axis=1).mean())
        for c in ctx.runs.cells
        if (c.experiment, c.model, c.benchmark, c.protocol, c.anchor, c.method)
        == (experiment, model, benchmark, protocol, SPA_ANCHOR, SPA.name)
        and not math.isclose(c.omega, BASELINE_OMEGA)
    }
    if len(ran) == 1:
        return next(iter(ran)), f"{experiment} run"
    sweep = ctx.sweep(model, benchmark, protocol)
    if not ran and sweep is not None:
        ran = sweep.pair_scores().drop(columns=BASELINE_OMEGA, errors="ignore").mean().to_dict()
    if ran:
        return select_omega(pd.Series(ran)), "test-set argmax (optimistic)"
    return math.nan, "no SPA run"


def paired_scores(ctx: Context, model: str, column: str, protocol: str | None, anchor: str, omega: float) -> pd.DataFrame:
    """Per-task ``baseline`` and ``spa`` pass rates (one protocol) on the tasks both cells have; a
    missing cell is a NaN column (the frame is empty when neither exists)."""
    benchmark = BENCHMARK_COLUMNS[column][0]
    pair = None if math.isnan(omega) else spa_pair(ctx.runs, model, benchmark, protocol, anchor, omega, ctx.settings)
    if pair is None:
        baselines = ctx.runs.find(model, benchmark, protocol, BASELINE_ANCHOR, BASELINE_OMEGA)
        if baselines:  # show the plain model's Pass@1 even without an SPA cell to compare
            baselines.sort(key=_preference(ctx.settings))
            return pd.DataFrame({"baseline": baselines[0].scores[column], "spa": math.nan})
        return pd.DataFrame(columns=["baseline", "spa"], dtype=float)
    if pair.baseline is None:
        return pd.DataFrame({"baseline": math.nan, "spa": pair.spa.scores[column]})
    return _aligned({"baseline": pair.baseline.scores[column], "spa": pair.spa.scores[column]})


def _is_paired(scores: pd.DataFrame) -> bool:
    return not scores.empty and bool(scores.notna().all().all())


def _fold_text(omegas: Iterable[float]) -> str:
    return " ".join(f"{w:g}" for w in omegas)


def _pair_cv(
    ctx: Context, model: str, benchmark: str, protocol: str | None, method: str = "spa", anchor: str = SPA_ANCHOR
) -> tuple[Sweep | None, OmegaSelection | None]:
    """The sweep of a dataset pair (default: SPA's, anchor NL) and its cross-validated omega, chosen on the
    pair score (mean of base and plus pass per task); None without a sweep of >= 2 omegas."""
    sweep = ctx.sweep(model, benchmark, protocol, method, anchor)
    if sweep is None:
        return None, None
    pair = sweep.pair_scores()
    if pair.shape[1] < 2 or pair.empty:
        return sweep, None
    return sweep, cross_validate_omega(pair, ctx.settings.cv_folds, ctx.settings.seed)


def _cv_columns(
    ctx: Context, sweep: Sweep | None, selection: OmegaSelection | None, column: str, prefix: str
) -> dict[str, object]:
    """Held-out Pass@1 of one column at the pair's per-fold omegas, and its gain over omega = 1
    (NaN without a selection)."""
    if sweep is None or selection is None:
        return {f"{prefix}spa": math.nan} | _gain_row(f"{prefix}", GainStats.missing())
    scores = sweep.scores(column)
    held_out = selection.held_out_of(scores)
    gain = GainStats.missing()
    if BASELINE_OMEGA in scores.columns:
        gain = ctx.stats((held_out - scores[BASELINE_OMEGA]).to_numpy())
    return {f"{prefix}spa": 100 * float(held_out.mean())} | _gain_row(prefix, gain)


def _cv_row(ctx: Context, model: str, column: str, protocol: str | None) -> dict[str, object]:
    """Table 1's CV columns: the pair-level cross-validated omega and this column's held-out Pass@1
    and gain (NaN without a sweep of >= 2 omegas)."""
    sweep, selection = _pair_cv(ctx, model, BENCHMARK_COLUMNS[column][0], protocol)
    row: dict[str, object] = {
        "sweep_experiment": sweep.experiment if sweep else None,
        "sweep_omegas": _fold_text(sweep.pair_scores().columns) if sweep else "",
        "cv_folds": selection.n_folds if selection else math.nan,
        "cv_omega": selection.mean_omega if selection else math.nan,
        "cv_fold_omegas": _fold_text(selection.fold_omegas) if selection else "",
    }
    return row | _cv_columns(ctx, sweep, selection, column, "cv_")


def _gain_row(prefix: str, stats: GainStats) -> dict[str, float]:
    return {
        f"{prefix}gain": stats.gain,
        f"{prefix}gain_ci_low": stats.ci_low,
        f"{prefix}gain_ci_high": stats.ci_high,
        f"{prefix}p_value": stats.p_value,
    }


def build_table1(ctx: Context) -> pd.DataFrame:
    """Per model, benchmark column and protocol (protocols adjacent): baseline and SPA Pass@1
    (anchor NL), gain with CI and p-value, the paper's numbers, and the cross-validated omega's
    held-out result. Both columns of a dataset pair use the same omega."""
    rows = []
    for model in ctx.models:
        protocols = ctx.model_protocols(model)
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            for protocol in protocols:
                omega, source = spa_omega(ctx, model, benchmark, protocol)
                pairs = paired_scores(ctx, model, column, protocol, SPA_ANCHOR, omega)
                paired = _is_paired(pairs)
                stats = ctx.stats((pairs.spa - pairs.baseline).to_numpy()) if paired else GainStats.missing()
                paper_key = (model, column)
                rows.append(
                    {
                        "model": display_name(model),
                        "model_key": model,
                        "benchmark": column,
                        "protocol": protocol,
                        "omega": omega,
                        "omega_source": source,
                        "n_tasks": len(pairs) or math.nan,
                        "baseline": 100 * pairs.baseline.mean(),  # NaN for a missing cell
                        "spa": 100 * pairs.spa.mean(),
                        **_gain_row("", stats),
                        "paper_baseline": ctx.paper.value("pass_at_1", paper_key, "baseline"),
                        "paper_spa": ctx.paper.value("pass_at_1", paper_key, "spa"),
                        "paper_gain": ctx.paper.value("pass_at_1", paper_key, "gain"),
                        **_cv_row(ctx, model, column, protocol),
                    }
                )
    return pd.DataFrame(rows)


def build_table2(ctx: Context) -> pd.DataFrame:
    """Mean gain over models per anchored text, benchmark column and protocol (protocols adjacent;
    each model at its Table 1 omega), with a CI and p-value that resample tasks jointly for all models."""
    rows = []
    for anchor, anchor_name in TABLE2_ANCHORS.items():
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            applicable = (anchor, benchmark) not in NOT_APPLICABLE
            for protocol in ctx.protocols:
                differences = {}
                for model in ctx.models if applicable else []:
                    omega = spa_omega(ctx, model, benchmark, protocol)[0]
                    pairs = paired_scores(ctx, model, column, protocol, anchor, omega)
                    if _is_paired(pairs):
                        differences[model] = pairs.spa - pairs.baseline
                stats = ctx.stats(_aligned(differences).to_numpy()) if differences else GainStats.missing()
                rows.append(
                    {
                        "anchor": anchor_name,
                        "anchor_key": anchor,
                        "benchmark": column,
                        "protocol": protocol,
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
    """Per model, dataset pair (HumanEval with HumanEval+, MBPP with MBPP+) and protocol: ONE omega
    for the pair, as the paper's Table 3. The test-set optimum and the cross-validated choice
    maximise the pair score (per task, the mean of its base and plus pass); each is reported with
    Pass@1 on both datasets; beside them the paper's (test-set-optimal) omega."""
    rows = []
    for model in ctx.models:
        protocols = ctx.model_protocols(model)
        for benchmark, (base_column, plus_column) in DATASET_PAIRS.items():
            for protocol in protocols:
                sweep, selection = _pair_cv(ctx, model, benchmark, protocol)
                pair = sweep.pair_scores() if sweep else pd.DataFrame()
                base = sweep.scores(base_column) if sweep else pd.DataFrame()
                plus = sweep.scores(plus_column) if sweep else pd.DataFrame()
                best = select_omega(pair.mean()) if not pair.empty else math.nan

                def at(scores: pd.DataFrame, omega: float) -> float:
                    present = not scores.empty and not math.isnan(omega) and omega in scores.columns
                    return 100 * float(scores[omega].mean()) if present else math.nan

                rows.append(
                    {
                        "model": display_name(model),
                        "model_key": model,
                        "benchmark": benchmark,
                        "datasets": f"{base_column} / {plus_column}",
                        "protocol": protocol,
                        "sweep_experiment": sweep.experiment if sweep else None,
                        "sweep_omegas": _fold_text(pair.columns),
                        "n_tasks": len(pair) or math.nan,
                        "baseline_base": at(base, BASELINE_OMEGA),
                        "baseline_plus": at(plus, BASELINE_OMEGA),
                        "test_optimal_omega": best,
                        "test_optimal_base": at(base, best),
                        "test_optimal_plus": at(plus, best),
                        "cv_folds": selection.n_folds if selection else math.nan,
                        "cv_fold_omegas": _fold_text(selection.fold_omegas) if selection else "",
                        "cv_omega": selection.mean_omega if selection else math.nan,
                        **_cv_columns(ctx, sweep, selection, base_column, "cv_base_"),
                        **_cv_columns(ctx, sweep, selection, plus_column, "cv_plus_"),
                        "paper_omega": paper_pair_omega(ctx, model, benchmark),
                    }
                )
    return pd.DataFrame(rows)


def build_figure4_data(ctx: Context) -> pd.DataFrame:
    """Pass@1 per model, benchmark column, protocol and omega of each sweep; the paper's Pass@1
    where its Table 1 gives one (omega = 1 and the paper's optimal omega; Figure 4 itself is only a plot)."""
    rows = []
    for model in ctx.models:
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            for protocol in ctx.model_protocols(model):
                sweep = ctx.sweep(model, benchmark, protocol)
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
                            "protocol": protocol,
                            "omega": omega,
                            "experiment": sweep.experiment,
                            "n_tasks": len(scores),
                            "pass_at_1": 100 * scores[omega].mean(),
                            "paper_pass_at_1": paper_value,
                        }
                    )
    columns = ["model", "model_key", "benchmark", "protocol", "omega", "experiment", "n_tasks", "pass_at_1",
               "paper_pass_at_1"]
    return pd.DataFrame(rows, columns=columns)


def variant_label(method: str, second_view: str) -> str:
    """A method variant's name in figures: ``"CFG (last prompt token)"``."""
    return f"{METHODS[method].label} ({second_view})"


def methods_run(runs: Runs) -> list[tuple[str, str, str]]:
    """The ``METHOD_VARIANTS`` with any cell, in that order."""
    present = {(c.method, c.anchor) for c in runs.cells}
    return [variant for variant in METHOD_VARIANTS if variant[:2] in present]


def _held_out(sweep: Sweep | None, selection: OmegaSelection | None, column: str) -> pd.Series | None:
    """Per task: its pass rate in ``column`` at the strength chosen without its fold (None without a selection)."""
    return None if sweep is None or selection is None else selection.held_out_of(sweep.scores(column))


def _strengths(method: str, omegas: Iterable[float]) -> list[float]:
    """Weights on the full prompt as the method's own strengths (CAD: alpha = weight - 1)."""
    return [_omega_key(METHODS[method].strength(omega)) for omega in omegas]


def build_methods_table(ctx: Context) -> pd.DataFrame:
    """Per model, benchmark column and protocol with any method run: every method variant at its
    cross-validated strength (one per dataset pair, chosen exactly as omega is for Tables 1 and 3, ties going
    to the weight closest to the plain model's), its held-out Pass@1, and paired gains (bootstrap CI over tasks,
    sign-test p) against the plain model and against SPA's own cross-validated result."""
    variants = methods_run(ctx.runs)
    rows = []
    for model in model_order(c.model for c in ctx.runs.cells):
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            for protocol in ctx.model_protocols(model):
                if not any(ctx.sweep(model, benchmark, protocol, m, a) for m, a, _ in variants):
                    continue
                spa_held = _held_out(*_pair_cv(ctx, model, benchmark, protocol), column)
                for method, anchor, second_view in variants:
                    sweep, selection = _pair_cv(ctx, model, benchmark, protocol, method, anchor)
                    scores = sweep.scores(column) if sweep else pd.DataFrame()
                    held = _held_out(sweep, selection, column)
                    plain = scores[BASELINE_OMEGA] if BASELINE_OMEGA in scores.columns else None
                    vs_plain = vs_spa = GainStats.missing()
                    if held is not None and plain is not None:
                        vs_plain = ctx.stats((held - plain).to_numpy())
                    if held is not None and spa_held is not None and method != SPA.name:
                        both_held = _aligned({"method": held, "spa": spa_held})
                        vs_spa = ctx.stats((both_held["method"] - both_held["spa"]).to_numpy())
                    pair = sweep.pair_scores() if sweep else pd.DataFrame()
                    best = select_omega(pair.mean()) if not pair.empty else math.nan
                    rows.append(
                        {
                            "model": display_name(model),
                            "model_key": model,
                            "benchmark": column,
                            "protocol": protocol,
                            "method": METHODS[method].label,
                            "method_key": method,
                            "anchor": anchor,
                            "second_view": second_view,
                            "parameter": METHODS[method].parameter,
                            "sweep_experiment": sweep.experiment if sweep else None,
                            "strengths": _fold_text(_strengths(method, scores.columns)),
                            "n_tasks": len(scores) or math.nan,
                            "plain": 100 * float(plain.mean()) if plain is not None else math.nan,
                            "cv_folds": selection.n_folds if selection else math.nan,
                            "cv_strength": _strengths(method, [selection.mean_omega])[0] if selection else math.nan,
                            "cv_fold_strengths": _fold_text(_strengths(method, selection.fold_omegas)) if selection else "",
                            "pass_at_1": 100 * float(held.mean()) if held is not None else math.nan,
                            **_gain_row("", vs_plain),
                            **_gain_row("vs_spa_", vs_spa),
                            "test_optimal_strength": _strengths(method, [best])[0],
                            "test_optimal_pass_at_1": 100 * float(scores[best].mean()) if best in scores.columns else math.nan,
                        }
                    )
    return pd.DataFrame(rows)


def build_methods_strength_data(ctx: Context) -> pd.DataFrame:
    """Pass@1 per model, benchmark column, protocol, method variant and strength of each sweep, with the weight
    on the full prompt (omega, guidance_scale, 1 + alpha) that puts every method on one axis."""
    rows = []
    for model in model_order(c.model for c in ctx.runs.cells):
        for column, (benchmark, _) in BENCHMARK_COLUMNS.items():
            for protocol in ctx.model_protocols(model):
                for method, anchor, second_view in METHOD_VARIANTS:
                    sweep = ctx.sweep(model, benchmark, protocol, method, anchor)
                    if sweep is None:
                        continue
                    scores = sweep.scores(column)
                    for omega, strength in zip(scores.columns, _strengths(method, scores.columns)):
                        rows.append(
                            {
                                "model": display_name(model),
                                "model_key": model,
                                "benchmark": column,
                                "protocol": protocol,
                                "method": variant_label(method, second_view),
                                "method_key": method,
                                "anchor": anchor,
                                "parameter": METHODS[method].parameter,
                                "strength": strength,
                                "weight": omega,
                                "experiment": sweep.experiment,
                                "n_tasks": len(scores),
                                "pass_at_1": 100 * scores[omega].mean(),
                            }
                        )
    columns = ["model", "model_key", "benchmark", "protocol", "method", "method_key", "anchor", "parameter", "strength",
               "weight", "experiment", "n_tasks", "pass_at_1"]
    return pd.DataFrame(rows, columns=columns)


ATTENTION_CURVE_KEYS = ["protocol", "model", "benchmark", "omega", "kind", "step"]


def attention_curves(attention: pd.DataFrame, max_step: int) -> pd.DataFrame:
    """Mean % of attention on the prompt per protocol, model, omega, kind and generated-token step
    over the tasks still generating, with a 95% normal-approximation band (NaN where fewer than 2
    tasks remain) and that count."""
    keys = ATTENTION_CURVE_KEYS
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


def both(header: str, first: str, second: str, spec: str) -> Show:
    """Two numbers of a dataset pair in one cell, "base / plus" (a missing one shows its mark)."""

    def render(row: pd.Series, missing: str) -> str:
        return " / ".join(missing if _missing(row[c]) else format(row[c], spec) for c in (first, second))

    return Show(header, render)


def model_of(header: str, column: str) -> Show:
    """A model key shown by its display name."""
    return Show(header, lambda row, missing: missing if _missing(row[column]) else display_name(str(row[column])),
                numeric=False)


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
        text("Protocol", "protocol"),
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
        text("Protocol", "protocol"),
        number("Models", "n_models", "d"),
        gain_with_ci("Mean gain [95% CI]"),
        number("p (sign test)", "p_value", ".3g"),
        number("Paper gain", "paper_gain", "+.2f"),
    ),
)
TABLE3 = TableSpec(
    "table3",
    f"Table 3: one omega per dataset pair, ours (test-set argmax and {{cv}}) vs {PAPER} Table 3; "
    "Pass@1 (%) as base / plus (HumanEval / HumanEval+, MBPP / MBPP+)",
    (
        text("Model", "model"),
        text("Datasets", "datasets"),
        text("Protocol", "protocol"),
        text("Omegas run", "sweep_omegas"),
        number("Tasks", "n_tasks", ".0f"),
        both("Baseline", "baseline_base", "baseline_plus", ".1f"),
        number("Test-optimal omega", "test_optimal_omega", "g"),
        both("Its Pass@1", "test_optimal_base", "test_optimal_plus", ".1f"),
        number("CV folds", "cv_folds", ".0f"),
        text("CV omega per fold", "cv_fold_omegas"),
        both("CV held-out Pass@1", "cv_base_spa", "cv_plus_spa", ".1f"),
        gain_with_ci("CV gain base [95% CI]", "cv_base_"),
        gain_with_ci("CV gain plus [95% CI]", "cv_plus_"),
        number("Paper omega", "paper_omega", "g"),
    ),
)
FIGURE4 = TableSpec(
    "figure4_omega",
    f"Figure 4 data: Pass@1 (%) per omega (anchor NL); paper values from {PAPER} Table 1 where it gives them",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        text("Protocol", "protocol"),
        number("omega", "omega", "g"),
        number("Tasks", "n_tasks", ".0f"),
        number("Pass@1", "pass_at_1", ".1f"),
        number("Paper Pass@1", "paper_pass_at_1", ".1f"),
    ),
)
METHODS_TABLE = TableSpec(
    "methods",
    "Methods: Pass@1 (%) of SPA and its baselines (CFG, CAD, PASTA), each at its cross-validated strength (one per dataset pair, k-fold "
    "over tasks as omega in Tables 1 and 3); gains in points with paired 95% CIs against the plain model and against SPA",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        text("Protocol", "protocol"),
        text("Method", "method"),
        text("Second view", "second_view"),
        text("Strength", "parameter"),
        text("Strengths run", "strengths"),
        number("Tasks", "n_tasks", ".0f"),
        number("Plain", "plain", ".1f"),
        number("CV strength", "cv_strength", ".3g"),
        number("CV Pass@1", "pass_at_1", ".1f"),
        gain_with_ci("vs plain [95% CI]"),
        number("p", "p_value", ".3g"),
        gain_with_ci("vs SPA [95% CI]", "vs_spa_"),
        number("p vs SPA", "vs_spa_p_value", ".3g"),
        number("Test-optimal strength", "test_optimal_strength", "g"),
    ),
)
METHODS_STRENGTH = TableSpec(
    "methods_strength",
    "Methods figure data: Pass@1 (%) per strength; weight = the weight on the full prompt (SPA omega, CFG "
    "guidance_scale, CAD 1 + alpha; 1 = the plain model)",
    (
        text("Model", "model"),
        text("Benchmark", "benchmark"),
        text("Protocol", "protocol"),
        text("Method", "method"),
        text("Strength", "parameter"),
        number("Value", "strength", "g"),
        number("Weight", "weight", "g"),
        number("Tasks", "n_tasks", ".0f"),
        number("Pass@1", "pass_at_1", ".1f"),
    ),
)
ATTENTION_TABLE = TableSpec(
    "attention_curves",
    f"Figures 2-3 data: % of attention on the prompt per generated token (mean over the sequences still "
    f"generating, 95% band, n alive); paper: {PAPER} Figures 2-3 (plots only)",
    (
        text("Protocol", "protocol"),
        model_of("Model", "model"),
        text("Benchmark", "benchmark"),
        number("omega", "omega", "g"),
        text("Kind", "kind"),
        number("Step", "step", ".0f"),
        number("Mean %", "mean", ".1f"),
        number("95% low", "low", ".1f"),
        number("95% high", "high", ".1f"),
        number("n", "n", ".0f"),
    ),
)


def table3_title(table3: pd.DataFrame, settings: Settings) -> str:
    """Table 3's title, naming the number of CV folds actually used (``min(cv_folds, tasks)`` per row)."""
    used = sorted({int(k) for k in table3.get("cv_folds", pd.Series(dtype=float)).dropna()})
    if not used:
        cv = f"cross-validated omega (none: no sweep of >= 2 omegas; cv_folds={settings.cv_folds})"
    elif len(used) == 1:
        cv = f"{used[0]}-fold CV"
    else:
        cv = f"{used[0]}- to {used[-1]}-fold CV, folds per row in 'CV folds'"
    return TABLE3.title.format(cv=cv)


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


def protocol_figure_name(stem: str, protocol: str) -> str:
    """File stem of a figure drawn from one protocol's runs: ``<stem>-<protocol>``."""
    return f"{stem}-{protocol}"


def attention_curves_of(ctx: Context) -> pd.DataFrame:
    """The Figures 2-3 curves of ``attention_benchmark`` (every protocol)."""
    curves = attention_curves(ctx.runs.attention, ctx.settings.max_step)
    return curves[curves["benchmark"] == ctx.settings.attention_benchmark].reset_index(drop=True)


ATTENTION_FIGURES = (
    ("figure2_self_attention", "self", "Self-attention on the prompt (last layer), ω = 1"),
    ("figure3_gradient_attention", "gradient", "Gradient-based attention on the prompt, ω = 1"),
)
SPA_VS_PLAIN = "attention_spa_vs_plain"


def _attention_figures(ctx: Context, curves: pd.DataFrame, figures_dir: Path, outputs: Outputs) -> None:
    """Figures 2, 3 and the SPA comparison, one set per protocol with attention runs."""
    settings = ctx.settings
    why = f"no complete attention runs for benchmark {settings.attention_benchmark!r} under {ATTENTION_EXPERIMENT}/"
    protocols = protocol_order(curves["protocol"])
    if not protocols:
        for name, kind, _ in ATTENTION_FIGURES:
            _figure_files(name, None, figures_dir, outputs, why)
        _figure_files(SPA_VS_PLAIN, None, figures_dir, outputs, why)
        return
    colors = _model_colors(ctx.models)
    for protocol in protocols:
        mine = curves[curves["protocol"] == protocol]
        mine = mine.assign(label=mine["model"].map(display_name))
        models = model_order(mine["model"])
        labels = [display_name(m) for m in models]
        plain = mine[np.isclose(mine["omega"].astype(float), BASELINE_OMEGA)]
        why_here = f"{why} with protocol {protocol!r}"
        for stem, kind, title in ATTENTION_FIGURES:
            data = plain[plain["kind"] == kind]
            figure = None
            if not data.empty:
                figure = figures.attention_figure(data, labels, colors, f"{title} (protocol {protocol})", settings.max_step)
            name = protocol_figure_name(stem, protocol)
            _figure_files(name, figure, figures_dir, outputs, why_here + f" with {kind} attention at omega = 1")
        compared = mine[mine.groupby("model")["omega"].transform("nunique") > 1]
        compared_labels = [display_name(m) for m in models if m in set(compared["model"])]
        figure = None
        if not compared.empty:
            figure = figures.spa_vs_plain_figure(compared, compared_labels, settings.max_step, f"protocol {protocol}")
        _figure_files(protocol_figure_name(SPA_VS_PLAIN, protocol), figure, figures_dir, outputs,
                      why_here + " at both omega = 1 and an SPA omega")


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
    curves = attention_curves_of(ctx)
    if what in ("all", "tables"):
        table3 = build_table3(ctx)
        for frame, spec in (
            (build_table1(ctx), TABLE1),
            (build_table2(ctx), TABLE2),
            (table3, replace(TABLE3, title=table3_title(table3, settings))),
            (figure4, FIGURE4),
        ):
            files, printed = table_files(frame, spec, tables_dir)
            outputs.files.update(files)
            outputs.printed.append(printed)
    if not curves.empty:  # the data of Figures 2-3: a table (not printed: one row per step)
        outputs.files.update(table_files(curves, ATTENTION_TABLE, tables_dir)[0])
    if what in ("all", "figures"):
        protocols = protocol_order(figure4["protocol"])
        if not protocols:
            _figure_files("figure4_omega", None, figures_dir, outputs, "no anchor-NL runs at omega != 1")
        colors = _model_colors(ctx.models)
        for protocol in protocols:
            data = figure4[figure4["protocol"] == protocol]
            figure = figures.omega_sweep_figure(data, list(BENCHMARK_COLUMNS), colors, f"Pass@1 against ω (protocol {protocol})")
            _figure_files(protocol_figure_name("figure4_omega", protocol), figure, figures_dir, outputs, "")
        _attention_figures(ctx, curves, figures_dir, outputs)
    _method_outputs(ctx, what, tables_dir, figures_dir, outputs)
    outputs.files[Path(out_dir) / "provenance.json"] = _provenance(runs, runs_dir, settings)
    return outputs


METHODS_FIGURE = "methods_strength"


def _method_outputs(ctx: Context, what: str, tables_dir: Path, figures_dir: Path, outputs: Outputs) -> None:
    """The method comparison (table ``methods``) and Pass@1 against strength (``methods_strength``: its data
    and one figure per protocol), when any method besides SPA has cells."""
    if not any(method != SPA.name for method, _, _ in methods_run(ctx.runs)):
        outputs.notes.append("methods and methods_strength skipped: no cells of method=cfg, cad or pasta")
        return
    data = build_methods_strength_data(ctx)
    if what in ("all", "tables"):
        for frame, spec in ((build_methods_table(ctx), METHODS_TABLE), (data, METHODS_STRENGTH)):
            files, printed = table_files(frame, spec, tables_dir)
            outputs.files.update(files)
            if spec is METHODS_TABLE:
                outputs.printed.append(printed)
    if what in ("all", "figures"):
        colors = {variant_label(m, view): f"C{i % 10}" for i, (m, _, view) in enumerate(METHOD_VARIANTS)}
        for protocol in protocol_order(data["protocol"]):
            mine = data[data["protocol"] == protocol]
            models = [display_name(m) for m in model_order(mine["model_key"])]
            figure = figures.method_strength_figure(mine, models, list(BENCHMARK_COLUMNS), colors,
                                                    f"Pass@1 against each method's strength (protocol {protocol})")
            _figure_files(protocol_figure_name(METHODS_FIGURE, protocol), figure, figures_dir, outputs, "")


def _provenance(runs: Runs, runs_dir: Path, settings: Settings) -> bytes:
    """What the tables and figures were built from: the aggregator's code and every cell it read."""
    from eval.store import git_commit, package_versions

    cells = [
        {"path": str(c.path.relative_to(runs_dir)), "experiment": c.experiment, "model": c.model, "benchmark": c.benchmark,
         "protocol": c.protocol, "method": c.method, "anchor": c.anchor, "omega": c.omega, "strength": c.strength,
         "fingerprint": c.fingerprint}
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

