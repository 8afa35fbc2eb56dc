"""One cell of an experiment: config -> prompts with anchors -> two-view decoding -> samples -> verdicts.

``run_group(cfgs)`` is what ``scripts/run.py`` calls for a sweep's group job (the cells of one model, benchmark and
protocol, decoded together; ``eval.experiments.grouping``), ``run_cell(cfg)`` for one cell. The protocol
(``eval.benchmarks.protocols``) turns each task into both views' ids, stops and programs; the method
(``eval.methods``: SPA, CFG or CAD) chooses the second view and the weight on the full prompt (PASTA: one view, its
attention steered). It is resumable: tasks
already in the cell's samples.jsonl are skipped, samples are appended (and fsynced) after every batch,
so a killed run loses at most the batch in flight, and a finished cell is not recomputed unless
``force=true``. omega = 1 (CFG's guidance_scale = 1, CAD's alpha = 0) is the plain model whatever is anchored,
so it is stored once per model and benchmark under ``anchor=none`` and reused by every anchor condition and method.

Generations are content-addressed: the samples live once per :class:`GenerationSettings` under
``results/cells/<key>/`` and every experiment's cell links its ``samples.jsonl`` there, so an experiment whose
cells another already generated (``anchor_ablation`` after ``omega_sweep``) only evaluates. Every cell and
generation is written under a blocking lock: a job that finds one being written waits, then reuses it.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
import spa
from eval.benchmarks.data import authors_file, dataset_sha256
from eval.benchmarks.protocols import ModelInputs, Protocol, ProtocolSettings, make_protocol
from eval.errors import ConfigError, Interrupted
from eval.experiments.settings import GenerationSettings, project_path, section
from eval.methods import PASTA, Method, plain, resolve_method
from eval.store import Cell, cell_dir, file_lock, fingerprint, git_commit, machine, package_versions, python_command


@dataclass(frozen=True)
class CellPlan:
    experiment: str
    model: str
    benchmark: str
    protocol: str
    anchor: str  # "none" for omega = 1
    omega: float  # the engine's weight on the full prompt (SPA's omega, CFG's guidance_scale, 1 + CAD's alpha); PASTA's alpha
    path: Path  # the experiment's cell
    settings: GenerationSettings  # everything that changes the samples; its fingerprint guards the cell directory
    generation_path: Path  # the shared generation: results/cells/<settings.key>
    method: Method = plain()
    masking: str | None = None  # the protocol's masking for the second view (None: the protocol's own)


def resolve_omega(value, model_cfg: DictConfig, benchmark: str) -> float:
    if isinstance(value, str) and value.strip().lower() == "paper":
        paper = (model_cfg.get("paper_omega") or {}).get(benchmark)
        if paper is None:
            raise ConfigError(
                f"spa.omega=paper but model {model_cfg.name!r} has no paper_omega for {benchmark!r}. Give a "
                "number (spa.omega=1.3) or add paper_omega to the model's config."
            )
        return float(paper)
    try:
        omega = float(value)
    except (TypeError, ValueError):
        omega = math.nan
    if not math.isfinite(omega):
        raise ConfigError(
            f"spa.omega must be a finite number or 'paper', got {value!r}. Example: spa.omega=1.3 (omega > 1 "
            "amplifies the anchored text, 1 is the plain model)."
        )
    return omega


def data_dir(cfg: DictConfig) -> Path:
    return project_path(cfg.paths.data_dir)


def protocol_settings(cfg: DictConfig) -> ProtocolSettings:
    return ProtocolSettings.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))


def build_protocol(cfg: DictConfig, tokenizer, masking: str | None = None) -> Protocol:
    """The protocol of ``cfg`` for a loaded tokenizer (it renders, tokenizes, stops and post-processes); its
    masked view uses ``masking``, else ``spa.masking``, else the protocol's own."""
    return make_protocol(
        protocol_settings(cfg), OmegaConf.to_container(cfg.model, resolve=True), tokenizer,
        masking=masking or cfg.spa.masking, max_new_tokens=int(cfg.generation.max_new_tokens), data_dir=data_dir(cfg),
        authors_data_dir=project_path(cfg.paths.authors_data_dir),
    )


def plan_cell(cfg: DictConfig, attention: bool = False) -> CellPlan | None:
    """The cell this config describes; None when it cannot run and the sweep asked to skip such cells.

    Attention cells (``attention=True``) record attention shares instead of samples; their directory
    has no anchor level and their settings include the measurement's.
    """
    benchmark = cfg.benchmark.name
    settings_of_protocol = protocol_settings(cfg)
    try:
        # Before any model is loaded: the condition must exist under the protocol.
        build_protocol(cfg, tokenizer=None).validate_condition(benchmark, cfg.anchor.condition)
    except ConfigError:
        if cfg.get("skip_invalid"):
            print(f"skip: anchor {cfg.anchor.condition!r} does not apply to {benchmark} under protocol="
                  f"{settings_of_protocol.name} (skip_invalid=true)")
            return None
        raise
    method = resolve_method(OmegaConf.to_container(cfg.method, resolve=True), OmegaConf.to_container(cfg.spa, resolve=True),
                            lambda: resolve_omega(cfg.spa.omega, cfg.model, benchmark), OmegaConf.to_container(cfg.model, resolve=True))
    if attention and method.name != "spa":
        raise ConfigError(
            f"scripts/attention.py measures attention under SPA only, but got method={method.describe()}. Leave "
            "method at spa (the default) and choose the strength with spa.omega."
        )
    if method.is_plain:
        method = plain()  # the plain model's cell, shared by every method
    omega = method.omega
    anchor = method.cell_anchor(cfg.anchor.condition)
    masking = method.protocol_masking(cfg.spa.masking)
    # The task selection is not a setting: it only decides how much of the generation exists.
    settings = GenerationSettings(
        model=section(cfg, "model"),
        quantization=section(cfg, "quantization"),
        benchmark=benchmark,
        dataset_sha256=dataset_sha256(benchmark, data_dir(cfg), settings_of_protocol.datasets.get(benchmark)),
        authors_file_sha256=(authors_file(benchmark, project_path(cfg.paths.authors_data_dir))[1]
                             if settings_of_protocol.name == "authors" else None),
        protocol=section(cfg, "protocol"),
        anchor=anchor,
        omega=omega,
        masking=masking or settings_of_protocol.masking,
        method=method.settings(),
        spa=section(cfg, "spa"),
        generation=section(cfg, "generation"),
        attention=section(cfg, "attention") if attention else None,
    )
    path = cell_dir(project_path(cfg.paths.runs_dir), cfg.experiment_name, cfg.model.name, benchmark, settings_of_protocol.name,
                    None if attention else anchor, method.strength, method=method.name, parameter=method.spec.parameter)
    return CellPlan(cfg.experiment_name, cfg.model.name, benchmark, settings_of_protocol.name, anchor, omega, path, settings,
                    project_path(cfg.paths.cells_dir) / settings.key, method, masking)


_LOADED: dict = {}


def load_tokenizer(cfg: DictConfig):
    """The model's tokenizer alone (the tiny model's is the real tokenizer it is built around)."""
    model_cfg = cfg.model
    if model_cfg.get("tokenizer_id"):
        source = model_cfg.tokenizer_id
    elif model_cfg.get("build_tiny"):
        source = project_path(model_cfg.build_tiny.tokenizer_dir)
    else:
        source = model_cfg.hf_id
    return spa.load_tokenizer(source, revision=None if model_cfg.get("tokenizer_id") else model_cfg.revision,
                              trust_remote_code=model_cfg.trust_remote_code)


def load(cfg: DictConfig):
    """(model, tokenizer), kept across the cells of a sweep run in one process."""
    key = fingerprint({"model": OmegaConf.to_container(cfg.model, resolve=True), "q": cfg.quantization.mode, "d": cfg.device_map})
    if key not in _LOADED:
        _LOADED.clear()  # one model in memory at a time
        model_cfg = cfg.model
        model_path = str(project_path(model_cfg.hf_id)) if model_cfg.get("build_tiny") else model_cfg.hf_id
        if model_cfg.get("build_tiny"):
            recipe = OmegaConf.to_container(model_cfg.build_tiny, resolve=True)
            tokenizer_dir = project_path(recipe.pop("tokenizer_dir"))
            spa.build_tiny_model(model_path, tokenizer_dir, **recipe)
        tokenizer = load_tokenizer(cfg)
        model = spa.load_model(model_path, revision=model_cfg.revision, dtype=model_cfg.dtype, quantization=cfg.quantization.mode,
                               device_map=cfg.device_map, trust_remote_code=model_cfg.trust_remote_code,
                               attn_implementation=model_cfg.attn_implementation)
        _LOADED[key] = (model, tokenizer)
    return _LOADED[key]


def select_tasks(cfg: DictConfig, tasks: dict[str, dict]) -> list[str]:
    if cfg.get("task_ids"):
        unknown = [t for t in cfg.task_ids if t not in tasks]
        if unknown:
            raise ConfigError(f"Unknown task ids {unknown[:5]} for {cfg.benchmark.name}; ids look like {next(iter(tasks))!r}.")
        return list(cfg.task_ids)
    ids = list(tasks)
    return ids[: cfg.limit] if cfg.get("limit") else ids


def describe(cfg: DictConfig, plan: CellPlan, task_ids: list[str]) -> dict:
    """The manifest's provenance: what produced the cell's files."""
    return {
        "experiment": plan.experiment,
        "model": {**plan.settings.model, "display_name": cfg.model.get("display_name")},
        "benchmark": plan.benchmark,
        "protocol": plan.protocol,
        "protocol_settings": plan.settings.protocol,
        "anchor": plan.anchor,
        "omega": plan.omega,
        "method": {**plan.method.settings(), "omega": plan.omega},
        "spa": {**OmegaConf.to_container(cfg.spa, resolve=True), **({"omega": plan.omega} if plan.method.name == "spa" else {})},
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "quantization": plan.settings.quantization["mode"],
        "dataset_sha256": plan.settings.dataset_sha256,
        "dataset_version": protocol_settings(cfg).datasets.get(plan.benchmark),
        "authors_file_sha256": plan.settings.authors_file_sha256,
        "settings": plan.settings.as_dict(),
        "seed": cfg.generation.seed,
        "task_ids": task_ids,
        "n_tasks": len(task_ids),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "command": python_command(),
        "git": git_commit(),
        "packages": package_versions(),
        "machine": machine(),
    }


@contextmanager
def claimed_cell(cfg: DictConfig, plan: CellPlan, records_name: str = "samples.jsonl"):
    """The locked cell of ``plan`` (refused if another configuration owns it)."""
    with Cell(plan.path, plan.settings.fingerprint, records_name) as cell:
        cell.claim(force=bool(cfg.force))
        yield cell


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """(shard, shards) of a run: shard ``i`` of ``N`` decodes tasks i, i + N, ... of each of its cells."""
    shards, shard = cfg.get("shards", 1), cfg.get("shard", 0)
    if not (type(shards) is int and type(shard) is int and shards >= 1 and 0 <= shard < shards):
        raise ConfigError(
            f"shards={shards!r} shard={shard!r}: shards must be an integer >= 1 and shard an integer from 0 to shards - 1. "
            "shards=4 shard=0,1,2,3 (with -m) splits every cell's tasks among 4 jobs, shard i taking tasks i, i + 4, ...; "
            "the last shard to finish evaluates the cell."
        )
    if shards > 1 and cfg.force:
        raise ConfigError(
            f"force=true with shards={shards}: every shard would discard what the others wrote. Run force=true once "
            "without shards (or delete the cell and its generation under results/cells/), then shard the rerun."
        )
    return shard, shards


def run_cell(cfg: DictConfig) -> Path | None:
    """Generate (or reuse) and evaluate one cell, resuming what exists; returns its directory."""
    return run_group([cfg])[0]


def run_group(cfgs: list[DictConfig]) -> list[Path | None]:
    """Run the cells of one model, benchmark and protocol as one job; returns each cell's directory (None: skipped).

    The model is loaded once and the missing tasks of every cell decode together, rows of different cells in the
    same forward passes (``spa.decode`` takes one omega per prompt and prefills identical views once). Each
    cell's samples go to its own generation, then each complete cell is evaluated. With ``shards=N shard=i``
    only tasks i, i + N, ... are decoded; a cell missing another shard's tasks is evaluated by the shard that
    completes it, or by ``scripts/evaluate_cells.py``.
    """
    started = time.time()
    paths, planned = [], {}
    for cfg in cfgs:
        plan = plan_cell(cfg)
        paths.append(plan.path if plan else None)
        if plan is None or plan.path in planned:  # omega = 1 is one cell for every anchor condition
            continue
        wanted = select_tasks(cfg, protocol_tasks(cfg, plan))
        with claimed_cell(cfg, plan) as cell:  # another configuration's cell is refused before anything is decoded
            if cell.is_complete() and set(wanted) <= set(cell.manifest().get("task_ids", [])):
                print(f"complete: {plan.path} (force=true recomputes it)")
                continue
        planned[plan.path] = (cfg, plan, wanted)
    if planned:
        generated = ensure_generations([(cfg, plan, wanted[shard::shards]) for cfg, plan, wanted in planned.values()
                                        for shard, shards in [shard_of(cfg)]])
        for cfg, plan, wanted in planned.values():
            finish_cell(cfg, plan, wanted, generated.get(plan.generation_path, 0), started)
    return paths


def finish_cell(cfg: DictConfig, plan: CellPlan, wanted: list[str], generated_here: int = 0, started: float | None = None) -> Path:
    """Link the cell to its generation and evaluate it once the generation holds every task of ``wanted``;
    until then (shards still decoding) its manifest says ``incomplete``."""
    started = time.time() if started is None else started
    with Cell(plan.path, plan.settings.fingerprint) as cell:
        cell.claim(force=False)  # force was applied when the job claimed the cell
        if cell.is_complete() and set(wanted) <= set(cell.manifest().get("task_ids", [])):
            print(f"complete: {plan.path} (force=true recomputes it)")  # another shard evaluated it
            return plan.path
        with Cell(plan.generation_path, plan.settings.fingerprint) as store:  # shards append under this lock
            generation = store.manifest() or {}
            samples = store.load_records()
        cell.link_records(plan.generation_path / cell.records_name)
        base_manifest = describe(cfg, plan, wanted)
        base_manifest["model"].update(generation.get("model", {}))
        runs = generation.get("runs", [])
        base_manifest["generation_store"] = {
            "key": plan.settings.key,
            "path": str(plan.generation_path),
            "fingerprint": plan.settings.fingerprint,
            "generated_by": sorted({run["experiment"] for run in runs}),
            "generated_here": generated_here,  # tasks this job decoded; the rest were reused or came from other shards
        }
        timings = {k: sum(run[k] for run in runs) for k in ("generation_seconds", "generated_tokens")}
        missing = set(wanted) - {s["task_id"] for s in samples}
        if missing:
            print(f"{plan.path}: {len(missing)} of {len(wanted)} tasks are not generated yet (other shards); the shard "
                  "that completes it, or scripts/evaluate_cells.py, evaluates it")
            cell.write_manifest({**base_manifest, "status": "incomplete", "missing_tasks": len(missing), "timings": timings})
            return plan.path
        status = "generated"
        if cfg.evaluate:
            from eval.execution.evaluate import evaluate_samples, executor_settings, write_eval_results

            order = {t: i for i, t in enumerate(wanted)}  # shards append in any order
            chosen = sorted((s for s in samples if s["task_id"] in order), key=lambda s: (order[s["task_id"]], s["sample_index"]))
            sandbox_config, limits = executor_settings(OmegaConf.to_container(cfg.executor, resolve=True))
            eval_start = time.time()
            results = evaluate_samples(
                plan.benchmark,
                [{"task_id": s["task_id"], "solution": s["solution"]} for s in chosen],
                data_dir=data_dir(cfg),
                n_workers=cfg.get("eval_workers"),
                cache_dir=project_path(cfg.paths.cache_dir) / "groundtruth",
                sandbox_config=sandbox_config,
                limits=limits,
                dataset_version=protocol_settings(cfg).datasets.get(plan.benchmark),
            )
            results["provenance"] = {**base_manifest, "fingerprint": cell.settings_fingerprint}
            write_eval_results(cell.results_path, results)
            timings["evaluation_seconds"] = time.time() - eval_start
            status = "complete"
            print(f"{plan.path}: pass@1 base {results['pass@1']['base']:.3f} plus {results['pass@1']['plus']:.3f}")
        timings["wall_seconds_last_run"] = time.time() - started
        cell.write_manifest({**base_manifest, "status": status, "timings": timings})
    return plan.path


def ensure_generations(jobs: list[tuple[DictConfig, CellPlan, list[str]]]) -> dict[Path, int]:
    """Make the shared generation of each ``(cfg, plan, tasks)`` hold ``tasks``, decoding the missing ones of all
    of them together; returns how many tasks were decoded per generation.

    A job holds its shard's decode lock on each generation while it decodes (the same shard started twice waits,
    then reuses), and the generation's own lock only to read it and append, so shards decode at once.
    """
    unique: dict[Path, tuple] = {}
    for job in jobs:
        unique.setdefault(job[1].generation_path, job)
    jobs = list(unique.values())
    with ExitStack() as decoding:
        for cfg, plan, _ in sorted(jobs, key=lambda job: str(job[1].generation_path)):  # one order: no deadlock between jobs
            shard, shards = shard_of(cfg)
            decoding.enter_context(file_lock(plan.generation_path / f".decode-{shard}-of-{shards}.lock", plan.generation_path))
        pending = []
        for cfg, plan, tasks in jobs:
            with Cell(plan.generation_path, plan.settings.fingerprint) as generation:
                generation.claim(force=bool(cfg.force))
                previous = generation.manifest() or {}
                done = {s["task_id"] for s in generation.load_records()}
                todo = [t for t in tasks if t not in done]
                if todo:
                    if len(todo) < len(tasks):
                        print(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} tasks done ({plan.generation_path})")
                    generation.write_manifest({"key": plan.settings.key, "settings": plan.settings.as_dict(),
                                               "model": previous.get("model", {}), "status": "incomplete",
                                               "task_ids": previous.get("task_ids", []), "runs": previous.get("runs", [])})
            pending.append((cfg, plan, todo))
        try:
            stats = generate_samples([job for job in pending if job[2]])
        except KeyboardInterrupt:
            kept = []
            for cfg, plan, tasks in jobs:
                with Cell(plan.generation_path, plan.settings.fingerprint) as generation:
                    have = {s["task_id"] for s in generation.load_records()}
                kept.append(f"{len(have & set(tasks))} of {len(tasks)} tasks of {plan.path} are kept in {generation.records_path}")
            raise Interrupted(f"interrupted: {'; '.join(kept)}; rerun the same command to resume from there.") from None
        for cfg, plan, todo in pending:
            with Cell(plan.generation_path, plan.settings.fingerprint) as generation:
                previous = generation.manifest() or {}  # read again: other shards may have added runs meanwhile
                runs = list(previous.get("runs", []))
                model = previous.get("model", {})
                if todo:
                    shard, shards = shard_of(cfg)
                    model = stats[plan.generation_path].pop("model")
                    runs.append({"experiment": plan.experiment, "tasks": len(todo), "batch_size": int(cfg.generation.batch_size),
                                 "shard": shard, "shards": shards, **stats[plan.generation_path],
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": python_command(),
                                 "git": git_commit(), "packages": package_versions(), "machine": machine()})
                task_ids = list(dict.fromkeys(s["task_id"] for s in generation.load_records()))
                if todo or previous.get("task_ids") != task_ids:
                    generation.write_manifest({"key": plan.settings.key, "settings": plan.settings.as_dict(), "model": model,
                                               "status": "generated", "task_ids": task_ids, "runs": runs})
    return {plan.generation_path: len(todo) for _, plan, todo in pending}


def protocol_tasks(cfg: DictConfig, plan: CellPlan) -> dict[str, dict]:
    """The tasks as the cell's protocol reads them (task ids, prompts, tests); no tokenizer needed."""
    return build_protocol(cfg, None, plan.masking).tasks(plan.benchmark)


def prepare_inputs(cfg: DictConfig, plan: CellPlan, task_ids: list[str], tokenizer) -> tuple[Protocol, dict, dict[str, ModelInputs]]:
    """(protocol, tasks, model inputs per task id) of a cell; each input's second view is the cell method's."""
    protocol = build_protocol(cfg, tokenizer, plan.masking)
    tasks = protocol.tasks(plan.benchmark)
    inputs = {t: plan.method.second_view(protocol.model_inputs(tasks[t], plan.benchmark, plan.anchor), tokenizer) for t in task_ids}
    return protocol, tasks, inputs


def decode_inputs(model, protocol: Protocol, inputs: list[ModelInputs], methods: list[Method], cfg: DictConfig, **kwargs) -> list[list[int]]:
    """``spa.decode`` on the protocol's views, each input at its own method's weight: explicit masked ids, or the
    anchor mask for attention masking; PASTA (``spa.pasta.decode``, one method for all) on the prompt alone,
    emphasizing its anchored tokens."""
    if methods[0].spec is PASTA:
        return spa.pasta.decode(
            model, [i.input_ids for i in inputs], [i.anchor_mask for i in inputs], alpha=methods[0].strength, heads=methods[0].heads,
            max_new_tokens=[i.max_new_tokens for i in inputs], eos_token_id=protocol.eos_ids(model),
            **protocol.decode_options(inputs), **kwargs,
        )
    if protocol.masking == "attention":
        views = {"anchor_masks": [i.anchor_mask for i in inputs], "masking": "attention"}
    else:
        views = {"masked_prompts": [i.masked_input_ids for i in inputs]}
    return spa.decode(
        model, [i.input_ids for i in inputs], omega=[m.omega for m in methods], max_new_tokens=[i.max_new_tokens for i in inputs],
        eos_token_id=protocol.eos_ids(model), modulated_by_prob=bool(cfg.spa.modulated_by_prob),
        **views, **protocol.decode_options(inputs), **kwargs,
    )


def generate_samples(jobs: list[tuple[DictConfig, CellPlan, list[str]]]) -> dict[Path, dict]:
    """Decode the ``todo`` tasks of every ``(cfg, plan, todo)`` (one model), rows of different cells in the same
    batches, appending each batch's samples to each cell's generation; returns per generation its timing stats."""
    if not jobs:
        return {}
    model, tokenizer = load(jobs[0][0])
    gen = jobs[0][0].generation  # the group's cells differ in anchor and strength only
    sampling = {k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k", "seed", "num_samples")}
    per_batch = max(1, int(gen.batch_size) // int(gen.num_samples))
    prepared = [prepare_inputs(cfg, plan, todo, tokenizer) for cfg, plan, todo in jobs]
    # Rows that one spa.decode call can hold: PASTA steers one strength per call; the masking and the weighting
    # are arguments of the call. Task-major order puts one task's rows of every cell side by side.
    kinds: dict[tuple, list[tuple[int, str]]] = {}
    position = {t: i for i, t in enumerate(prepared[0][1])}  # the benchmark's order, as each cell alone decodes it
    for task in sorted({t for _, _, todo in jobs for t in todo}, key=position.__getitem__):
        for j, (cfg, plan, todo) in enumerate(jobs):
            if task in prepared[j][2]:
                kind = (j if plan.method.spec is PASTA else -1, prepared[j][0].masking == "attention", bool(cfg.spa.modulated_by_prob))
                kinds.setdefault(kind, []).append((j, task))
    stats = {plan.generation_path: {"generation_seconds": 0.0, "generated_tokens": 0} for _, plan, _ in jobs}
    first_plan = jobs[0][1]
    label = (f"{first_plan.model} {first_plan.benchmark} {first_plan.protocol} {first_plan.method.name} {first_plan.anchor} "
             f"{first_plan.method.spec.parameter}={first_plan.method.strength:g}" if len(jobs) == 1 else
             f"{first_plan.model} {first_plan.benchmark} {first_plan.protocol}: {len(jobs)} cells")
    with tqdm(total=sum(map(len, kinds.values())), desc=label, unit="task") as bar:  # closed on Ctrl-C too
        for rows in kinds.values():
            j0 = rows[0][0]
            for start in range(0, len(rows), per_batch):
                batch = rows[start : start + per_batch]
                begin = time.time()
                outputs = decode_inputs(model, prepared[j0][0], [prepared[j][2][t] for j, t in batch], [jobs[j][1].method for j, _ in batch],
                                        jobs[j0][0], batch_size=int(gen.batch_size), **sampling)
                elapsed = time.time() - begin
                records: dict[int, list[dict]] = {}
                for index, ids in enumerate(outputs):
                    j, task_id = batch[index // int(gen.num_samples)]
                    protocol, tasks, inputs = prepared[j]
                    model_inputs = inputs[task_id]
                    stats[jobs[j][1].generation_path]["generated_tokens"] += len(ids)
                    stats[jobs[j][1].generation_path]["generation_seconds"] += elapsed / len(outputs)  # the batch's time, by rows
                    records.setdefault(j, []).append({
                        "task_id": task_id,
                        "sample_index": index % int(gen.num_samples),
                        **protocol.solution(tasks[task_id], model_inputs, ids, protocol.eos_ids(model)),
                        "n_prompt_tokens": len(model_inputs.input_ids),
                        "n_masked_prompt_tokens": len(model_inputs.masked_input_ids),
                        "n_anchored_tokens": sum(model_inputs.anchor_mask),
                        "n_generated_tokens": len(ids),
                        "max_new_tokens": model_inputs.max_new_tokens,
                    })
                for j, new in records.items():
                    plan = jobs[j][1]
                    with Cell(plan.generation_path, plan.settings.fingerprint) as generation:
                        # Another shard (or a shard started twice) may have written a task meanwhile: it is kept once.
                        done = {s["task_id"] for s in generation.load_records()}
                        generation.append_records([r for r in new if r["task_id"] not in done])
                bar.update(len(batch))
    device = spa.engine.model_device(model)
    for j, (cfg, plan, _) in enumerate(jobs):
        protocol = prepared[j][0]
        stats[plan.generation_path]["model"] = {
            "resolved_commit": getattr(model.config, "_commit_hash", None), "device": str(device), "torch_dtype": str(model.dtype),
            "mask_string": protocol.mask_text(), "mask_token_id": spa.resolve_mask_token_id(tokenizer, protocol.mask_string())}
    return stats


def run_attention_cell(cfg: DictConfig) -> Path | None:
    """Record attention shares on the prompt per generated token (paper Figures 2-3), resumably."""
    from spa.attention import measure_attention

    plan = plan_cell(cfg, attention=True)
    if plan is None:
        return None
    with claimed_cell(cfg, plan, records_name="attention.jsonl") as cell:
        wanted = select_tasks(cfg, protocol_tasks(cfg, plan))
        manifest = cell.manifest()
        done = {r["task_id"] for r in cell.load_records()}
        todo = [t for t in wanted if t not in done]
        if not todo and manifest and manifest.get("status") == "complete":
            print(f"complete: {plan.path} (force=true recomputes it)")
            return plan.path
        base_manifest = describe(cfg, plan, wanted)
        base_manifest["attention"] = OmegaConf.to_container(cfg.attention, resolve=True)
        cell.write_manifest({**base_manifest, "status": "incomplete"})
        started = time.time()
        if todo:
            model, tokenizer = load(cfg)
            protocol, _, inputs = prepare_inputs(cfg, plan, todo, tokenizer)
            text_level = protocol.masking in ("replace", "delete")
            settings = cfg.attention
            # The gradient measurement is costly: only the first grad_tasks tasks of the selection get it.
            grad_tasks = set(wanted if settings.grad_tasks is None else wanted[: settings.grad_tasks])
            measure_attention(
                model,
                [inputs[t].input_ids for t in todo],
                [inputs[t].anchor_mask for t in todo],
                todo,
                omega=plan.omega,
                mask_token_id=spa.resolve_mask_token_id(tokenizer, protocol.mask_string()),
                max_new_tokens=int(cfg.generation.max_new_tokens),
                eos_token_id=protocol.eos_ids(model),
                self_every=settings.self_every,
                grad_every=settings.grad_every,
                grad_task_ids=grad_tasks,
                grad_batch_size=int(settings.grad_batch_size),
                masking="token" if text_level else protocol.masking,
                masked_prompts=[inputs[t].masked_input_ids for t in todo] if text_level else None,
                gradient_target=protocol.settings.attention_gradient,
                batch_size=int(cfg.generation.batch_size),
                on_record=lambda record: cell.append_records([record]),
            )
        cell.write_manifest({**base_manifest, "status": "complete", "timings": {"wall_seconds_last_run": time.time() - started}})
    return plan.path
