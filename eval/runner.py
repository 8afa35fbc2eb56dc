"""One cell of an experiment: config -> prompts with anchors -> two-view decoding -> samples -> verdicts.

``run_cell(cfg)`` is what ``scripts/run.py`` calls for every point of a sweep. The protocol
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
from contextlib import contextmanager
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
from eval.store import Cell, cell_dir, fingerprint, git_commit, machine, package_versions, python_command


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


def run_cell(cfg: DictConfig) -> Path | None:
    """Generate (or reuse) and evaluate one cell, resuming what exists; returns its directory."""
    plan = plan_cell(cfg)
    if plan is None:
        return None
    with claimed_cell(cfg, plan) as cell:
        wanted = select_tasks(cfg, protocol_tasks(cfg, plan))
        manifest = cell.manifest()
        if cell.is_complete() and set(wanted) <= set(manifest.get("task_ids", [])):
            print(f"complete: {plan.path} (force=true recomputes it)")
            return plan.path
        started = time.time()
        generation = ensure_generation(cfg, plan, wanted)
        cell.link_records(plan.generation_path / cell.records_name)
        samples = cell.load_records()
        base_manifest = describe(cfg, plan, wanted)
        base_manifest["model"].update(generation["model"])
        base_manifest["generation_store"] = {
            "key": plan.settings.key,
            "path": str(plan.generation_path),
            "fingerprint": plan.settings.fingerprint,
            "generated_by": sorted({run["experiment"] for run in generation["runs"]}),
            "generated_here": generation["generated_here"],  # tasks this run decoded; the rest were reused
        }
        timings = {k: sum(run[k] for run in generation["runs"]) for k in ("generation_seconds", "generated_tokens")}
        status = "generated"
        if cfg.evaluate:
            from eval.execution.evaluate import evaluate_samples, executor_settings, write_eval_results

            chosen = [s for s in samples if s["task_id"] in set(wanted)]
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


def ensure_generation(cfg: DictConfig, plan: CellPlan, wanted: list[str]) -> dict:
    """Make the shared generation of ``plan`` hold every task of ``wanted``, decoding only the missing ones;
    returns its manifest plus ``generated_here`` (how many tasks this call decoded).

    The generation's lock is held only while decoding, so other experiments reuse it while this one evaluates.
    """
    with Cell(plan.generation_path, plan.settings.fingerprint) as generation:
        generation.claim(force=bool(cfg.force))
        previous = generation.manifest() or {}
        done = {s["task_id"] for s in generation.load_records()}
        todo = [t for t in wanted if t not in done]
        runs = list(previous.get("runs", []))
        header = {"key": plan.settings.key, "settings": plan.settings.as_dict(), "model": previous.get("model", {})}
        if todo:
            if len(todo) < len(wanted):
                print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} tasks done ({plan.generation_path})")
            generation.write_manifest({**header, "status": "incomplete", "task_ids": previous.get("task_ids", []), "runs": runs})
            try:
                stats = generate_samples(cfg, plan, todo, generation)
            except KeyboardInterrupt:
                kept = len({s["task_id"] for s in generation.load_records()} & set(wanted))
                raise Interrupted(
                    f"interrupted: {kept} of {len(wanted)} tasks of {plan.path} are kept in {generation.records_path}; "
                    "rerun the same command to resume from there."
                ) from None
            header["model"] = stats.pop("model")
            runs.append({"experiment": plan.experiment, "tasks": len(todo), "batch_size": int(cfg.generation.batch_size),
                         **stats, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": python_command(),
                         "git": git_commit(), "packages": package_versions(), "machine": machine()})
        task_ids = [t for t in dict.fromkeys(s["task_id"] for s in generation.load_records())]
        manifest = {**header, "status": "generated", "task_ids": task_ids, "runs": runs}
        if todo or previous.get("task_ids") != task_ids:
            generation.write_manifest(manifest)
    return {**manifest, "generated_here": len(todo)}


def protocol_tasks(cfg: DictConfig, plan: CellPlan) -> dict[str, dict]:
    """The tasks as the cell's protocol reads them (task ids, prompts, tests); no tokenizer needed."""
    return build_protocol(cfg, None, plan.masking).tasks(plan.benchmark)


def prepare_inputs(cfg: DictConfig, plan: CellPlan, task_ids: list[str], tokenizer) -> tuple[Protocol, dict, dict[str, ModelInputs]]:
    """(protocol, tasks, model inputs per task id) of a cell; each input's second view is the cell method's."""
    protocol = build_protocol(cfg, tokenizer, plan.masking)
    tasks = protocol.tasks(plan.benchmark)
    inputs = {t: plan.method.second_view(protocol.model_inputs(tasks[t], plan.benchmark, plan.anchor), tokenizer) for t in task_ids}
    return protocol, tasks, inputs


def decode_inputs(model, protocol: Protocol, inputs: list[ModelInputs], method: Method, cfg: DictConfig, **kwargs) -> list[list[int]]:
    """``spa.decode`` on the protocol's views: explicit masked ids, or the anchor mask for attention masking; PASTA
    (``spa.pasta.decode``) on the prompt alone, emphasizing its anchored tokens."""
    if method.spec is PASTA:
        return spa.pasta.decode(
            model, [i.input_ids for i in inputs], [i.anchor_mask for i in inputs], alpha=method.strength, heads=method.heads,
            max_new_tokens=[i.max_new_tokens for i in inputs], eos_token_id=protocol.eos_ids(model),
            **protocol.decode_options(inputs), **kwargs,
        )
    if protocol.masking == "attention":
        views = {"anchor_masks": [i.anchor_mask for i in inputs], "masking": "attention"}
    else:
        views = {"masked_prompts": [i.masked_input_ids for i in inputs]}
    return spa.decode(
        model, [i.input_ids for i in inputs], omega=method.omega, max_new_tokens=[i.max_new_tokens for i in inputs],
        eos_token_id=protocol.eos_ids(model), modulated_by_prob=bool(cfg.spa.modulated_by_prob),
        **views, **protocol.decode_options(inputs), **kwargs,
    )


def generate_samples(cfg: DictConfig, plan: CellPlan, todo: list[str], cell: Cell) -> dict:
    """Decode ``todo`` in batches, appending each batch's samples to the cell; returns timing stats."""
    model, tokenizer = load(cfg)
    protocol, tasks, inputs = prepare_inputs(cfg, plan, todo, tokenizer)
    eos = protocol.eos_ids(model)
    gen = cfg.generation
    sampling = {k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k", "seed", "num_samples")}
    per_batch = max(1, int(gen.batch_size) // int(gen.num_samples))
    tokens, seconds = 0, 0.0
    method = plan.method
    with tqdm(total=len(todo), desc=f"{plan.model} {plan.benchmark} {plan.protocol} {method.name} {plan.anchor} "
                f"{method.spec.parameter}={method.strength:g}", unit="task") as bar:  # closed on Ctrl-C too
        for start in range(0, len(todo), per_batch):
            batch = todo[start : start + per_batch]
            begin = time.time()
            outputs = decode_inputs(model, protocol, [inputs[t] for t in batch], method, cfg,
                                    batch_size=int(gen.batch_size), **sampling)
            seconds += time.time() - begin
            records = []
            for index, ids in enumerate(outputs):
                task_id = batch[index // int(gen.num_samples)]
                model_inputs = inputs[task_id]
                tokens += len(ids)
                records.append({
                    "task_id": task_id,
                    "sample_index": index % int(gen.num_samples),
                    **protocol.solution(tasks[task_id], model_inputs, ids, eos),
                    "n_prompt_tokens": len(model_inputs.input_ids),
                    "n_masked_prompt_tokens": len(model_inputs.masked_input_ids),
                    "n_anchored_tokens": sum(model_inputs.anchor_mask),
                    "n_generated_tokens": len(ids),
                    "max_new_tokens": model_inputs.max_new_tokens,
                })
            cell.append_records(records)
            bar.update(len(batch))
    device = spa.engine.model_device(model)
    return {
        "model": {"resolved_commit": getattr(model.config, "_commit_hash", None), "device": str(device),
                  "torch_dtype": str(model.dtype), "mask_string": protocol.mask_text(),
                  "mask_token_id": spa.resolve_mask_token_id(tokenizer, protocol.mask_string())},
        "generation_seconds": seconds,
        "generated_tokens": tokens,
    }


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
