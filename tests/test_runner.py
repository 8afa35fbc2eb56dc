"""The cell runner and results store: layout, provenance, resume after a crash, guards, CLI errors, and the
cells of every method (SPA, CFG, CAD)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from hydra import compose, initialize_config_dir

from eval.cli import CONFIG_DIR
from eval.errors import ConfigError, HarnessError
from eval.runner import run_cell
from tests.conftest import REPO_ROOT, canonical_samples


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, model_cache, data_dir):
    def make(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("run", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}", f"paths.data_dir={data_dir}",
                                             "limit=3", "evaluate=false", "generation.max_new_tokens=6", *overrides])

    return make


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cell_layout_and_provenance(make_cfg, tmp_path):
    path = run_cell(make_cfg("benchmark=mbpp", "anchor=nl+test", "spa.omega=1.3", "experiment_name=unit"))
    assert path == tmp_path / "runs" / "unit" / "tiny" / "mbpp" / "evalplus" / "nl+test" / "omega=1.3"
    samples = read_lines(path / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["Mbpp/2", "Mbpp/3", "Mbpp/4"]
    assert all(s["n_generated_tokens"] <= 6 and s["n_anchored_tokens"] > 0 and "solution" in s for s in samples)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "generated"  # evaluation was switched off
    assert manifest["dataset_sha256"] == "af43697e8791c4c149bdfd6b489d8b5412507551ac20e28a439f650b8225db63"
    assert manifest["git"]["commit"] and manifest["packages"]["torch"] and manifest["packages"]["transformers"]
    assert manifest["model"]["hf_id"].endswith("tiny-deepseek-llama") and manifest["model"]["mask_token_id"] == 32014
    assert manifest["omega"] == 1.3 and manifest["seed"] == 0 and manifest["fingerprint"]
    assert manifest["config"]["generation"]["max_new_tokens"] == 6


@pytest.mark.parametrize("method", [["spa.omega=1.3"], ["method=cfg"], ["method=cad", "method.alpha=1"]])
def test_resume_after_crash_keeps_finished_tasks(make_cfg, method):
    cfg = make_cfg(*method)
    path = run_cell(cfg)
    samples_file = path / "samples.jsonl"
    full = samples_file.read_bytes()
    lines = full.decode().splitlines(keepends=True)
    # A crash while writing the third task: its line is cut in the middle.
    samples_file.write_text("".join(lines[:2]) + lines[2][:25])
    with pytest.warns(UserWarning, match="truncated last line"):
        run_cell(cfg)
    assert samples_file.read_bytes() == full, "finished tasks are kept as they were and the lost one is redone identically"
    # A larger selection only generates what is missing.
    run_cell(make_cfg(*method, "limit=4"))
    after = read_lines(samples_file)
    assert [s["task_id"] for s in after] == ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3"]
    assert samples_file.read_bytes().startswith(full)


def test_omega_one_is_stored_once_for_every_anchor(make_cfg, tmp_path):
    first = run_cell(make_cfg("anchor=nl", "spa.omega=1.0"))
    second = run_cell(make_cfg("anchor=nl+test", "spa.omega=1"))
    assert first == second == tmp_path / "runs" / "default" / "tiny" / "humaneval" / "evalplus" / "none" / "omega=1.0"
    assert len(read_lines(first / "samples.jsonl")) == 3


def test_a_cell_from_another_config_is_refused(make_cfg):
    path = run_cell(make_cfg("spa.omega=1.3"))
    before = (path / "samples.jsonl").read_bytes()
    with pytest.raises(HarnessError, match="different configuration"):
        run_cell(make_cfg("spa.omega=1.3", "generation.max_new_tokens=7"))
    assert (path / "samples.jsonl").read_bytes() == before, "nothing is lost"
    run_cell(make_cfg("spa.omega=1.3", "generation.max_new_tokens=7", "force=true"))
    assert all(s["n_generated_tokens"] <= 7 for s in read_lines(path / "samples.jsonl"))


def test_invalid_combinations(make_cfg):
    with pytest.raises(ConfigError, match="MBPP"):
        run_cell(make_cfg("benchmark=mbpp", "anchor=nl+code"))
    assert run_cell(make_cfg("benchmark=mbpp", "anchor=nl+code", "skip_invalid=true")) is None
    with pytest.raises(ConfigError, match="finite number or 'paper'"):
        run_cell(make_cfg("spa.omega=abc"))


@pytest.mark.parametrize("arguments, message", [
    (["model=gpt5"], "Unknown model 'gpt5'"),
    (["anchor=nl+docs"], "Unknown anchor 'nl+docs'"),
    (["benchmark=apps"], "Unknown benchmark 'apps'"),
    (["spa.omega=strong"], "finite number or 'paper'"),
    (["method=dola"], "Unknown method 'dola'"),
    (["-m", "method=cfg,cad", "method.guidance_scale=2"], "method=cad has no setting 'method.guidance_scale'"),
    (["method=cfg", "spa.omega=1.3"], "spa.omega=1.3 is a setting of SPA and has no effect with method=cfg"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(arguments, message, tmp_path, data_dir):
    result = subprocess.run([sys.executable, "scripts/run.py", *arguments, f"paths.results_dir={tmp_path}", f"paths.data_dir={data_dir}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_attention_cell_records_and_resumes(tmp_path, model_cache, data_dir):
    from eval.runner import run_attention_cell

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("attention", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}", f"paths.data_dir={data_dir}",
                                              "limit=2", "generation.max_new_tokens=8", "spa.omega=1.3", "attention.grad_every=4", "attention.grad_tasks=1"])
    path = run_attention_cell(cfg)
    assert path == tmp_path / "runs" / "attention" / "tiny" / "humaneval" / "evalplus" / "omega=1.3"
    records = {r["task_id"]: r for r in read_lines(path / "attention.jsonl")}
    assert set(records) == {"HumanEval/0", "HumanEval/1"}
    first = records["HumanEval/0"]
    assert first["self_steps"] == list(range(first["n_generated"])) and first["self_prompt_share"][0] == 1.0
    assert all(0.0 <= s <= 1.0 for s in first["self_prompt_share"] + first["grad_prompt_share"])
    assert first["grad_steps"] == [0, 4] and records["HumanEval/1"]["grad_steps"] == []
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["experiment"] == "attention" and manifest["attention"]["grad_every"] == 4
    before = (path / "attention.jsonl").read_bytes()
    run_attention_cell(cfg)
    assert (path / "attention.jsonl").read_bytes() == before


def test_a_job_waits_for_a_generation_being_written_then_reuses_it(make_cfg, capfd):
    """Two processes (e.g. SLURM jobs) never write one generation; the second waits instead of failing."""
    from eval.runner import plan_cell
    from eval.store import Cell

    cfg = make_cfg("spa.omega=1.3")
    plan = plan_cell(cfg)
    finished = {}
    with Cell(plan.generation_path, plan.settings.fingerprint):  # another job holds it
        worker = threading.Thread(target=lambda: finished.update(path=run_cell(cfg)))
        worker.start()
        seen, deadline = "", time.time() + 120
        while "waiting for" not in seen and worker.is_alive() and time.time() < deadline:
            time.sleep(0.2)
            seen += capfd.readouterr().err
        assert f"waiting for {plan.generation_path}: another job is writing it" in seen
        assert worker.is_alive() and not (plan.generation_path / "samples.jsonl").exists()
    worker.join(timeout=300)
    assert finished["path"] == plan.path and len(read_lines(plan.path / "samples.jsonl")) == 3


def test_cell_end_to_end_with_sandboxed_evaluation(tmp_path, ground_truth_cache, data_dir):
    """Generation, then the executor: verdicts for every sample, a complete manifest, and no rerun."""
    cache_dir, canonical = ground_truth_cache
    canonical("mbpp")  # builds the ground-truth cache the cell reuses
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={cache_dir.parent}", f"paths.data_dir={data_dir}",
                                        "benchmark=mbpp", "limit=2", "generation.max_new_tokens=6", "spa.omega=1.3", "eval_workers=2"])
    path = run_cell(cfg)
    results = json.loads((path / "eval_results.json").read_text())
    assert set(results["tasks"]) == {"Mbpp/2", "Mbpp/3"}
    assert all(e["base_status"] in ("pass", "fail", "timeout", "error") for es in results["tasks"].values() for e in es)
    assert results["pass@1"] == {"base": 0.0, "plus": 0.0}, "random weights cannot solve MBPP"
    assert results["provenance"]["fingerprint"] == json.loads((path / "manifest.json").read_text())["fingerprint"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["timings"]["evaluation_seconds"] > 0
    # A canonical solution written into the cell's samples passes through the same path.
    samples = read_lines(path / "samples.jsonl")
    task = canonical_samples("mbpp")[0]
    samples[0]["solution"] = task["solution"]
    (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (path / "manifest.json").write_text(json.dumps({**manifest, "status": "generated"}))
    run_cell(cfg)
    assert json.loads((path / "eval_results.json").read_text())["tasks"]["Mbpp/2"][0]["base_status"] == "pass"
    stamp = (path / "eval_results.json").stat().st_mtime_ns
    run_cell(cfg)
    assert (path / "eval_results.json").stat().st_mtime_ns == stamp, "a complete cell is not recomputed"


def test_authors_protocol_cell(make_cfg, tmp_path, data_dir):
    """protocol=authors: its own directory, their prompts and shorter masked view, the total-length budget."""
    from eval.benchmarks.protocols import ProtocolSettings, make_protocol
    from eval.runner import load_tokenizer

    cfg = make_cfg("protocol=authors", "benchmark=mbpp", "spa.omega=1.3", "experiment_name=unit")
    path = run_cell(cfg)
    assert path == tmp_path / "runs" / "unit" / "tiny" / "mbpp" / "authors" / "nl" / "omega=1.3"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["protocol"] == "authors" and manifest["dataset_version"] == "v0.1.0"
    assert manifest["dataset_sha256"] == "57d639e77667d88930052b2b07212011c25c0bab94dfc1f19d15e1f7f558bfa9"
    assert manifest["authors_file_sha256"] == "7d0618f25b41baf162d8de1237f74936a6448b7b061dcb26940bfa8c0d85153d"
    assert manifest["model"]["mask_string"] == "<pad>" and manifest["model"]["mask_token_id"] == 32018
    samples = read_lines(path / "samples.jsonl")
    protocol = make_protocol(ProtocolSettings.from_config(manifest["protocol_settings"]), manifest["config"]["model"],
                             load_tokenizer(cfg), masking=None, max_new_tokens=6, data_dir=data_dir,
                             authors_data_dir=data_dir.parent / "reference" / "spa-authors" / "dataset")
    tasks = protocol.tasks("mbpp")
    for sample in samples:
        inputs = protocol.model_inputs(tasks[sample["task_id"]], "mbpp", "nl")
        assert sample["n_prompt_tokens"] == len(inputs.input_ids) > sample["n_masked_prompt_tokens"] == len(inputs.masked_input_ids)
        assert sample["n_generated_tokens"] <= 6 and sample["raw_solution"] == sample["completion"]
    # The same settings under the other protocol are another cell; nothing is shared or refused.
    other = run_cell(make_cfg("protocol=evalplus", "benchmark=mbpp", "spa.omega=1.3", "experiment_name=unit"))
    assert other.parent.parent.name == "evalplus" and other != path


def test_authors_protocol_refuses_conditions_it_never_ran(make_cfg):
    with pytest.raises(ConfigError, match="does not exist in the authors' code"):
        run_cell(make_cfg("protocol=authors", "anchor=nl+code"))
    assert run_cell(make_cfg("protocol=authors", "anchor=nl+code", "skip_invalid=true")) is None


def test_authors_protocol_attention_cell(tmp_path, model_cache, data_dir):
    """Under protocol=authors the attention run decodes with their shorter masked view and their gradient."""
    from eval.runner import run_attention_cell

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("attention", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}", f"paths.data_dir={data_dir}",
                                              "protocol=authors", "limit=1", "generation.max_new_tokens=5", "spa.omega=1.3",
                                              "attention.grad_every=4", "attention.grad_tasks=1"])
    path = run_attention_cell(cfg)
    assert path == tmp_path / "runs" / "attention" / "tiny" / "humaneval" / "authors" / "omega=1.3"
    (record,) = read_lines(path / "attention.jsonl")
    assert record["grad_steps"] == [0, 4] and record["self_prompt_share"][0] == pytest.approx(1.0)
    assert json.loads((path / "manifest.json").read_text())["protocol_settings"]["attention_gradient"] == "top100_logit_sum"


# ---- Other methods than SPA (eval/methods.py) -----------------------------------------------------


def test_method_cells_layout_and_second_views(make_cfg, tmp_path):
    """CFG and CAD cells add a method level; their second views are the last prompt token, the masked view
    (= SPA at omega = guidance_scale, sample for sample) and the prompt with the NL deleted."""
    runs = tmp_path / "runs" / "unit" / "tiny" / "humaneval" / "evalplus"
    cfg_path = run_cell(make_cfg("method=cfg", "anchor=nl+test", "experiment_name=unit"))
    assert cfg_path == runs / "cfg" / "none" / "guidance_scale=1.5", "the last-token negative ignores the anchor"
    samples = read_lines(cfg_path / "samples.jsonl")
    assert all(s["n_masked_prompt_tokens"] == 1 for s in samples)
    manifest = json.loads((cfg_path / "manifest.json").read_text())
    assert manifest["method"] == {"name": "cfg", "guidance_scale": 1.5, "negative": "last_token", "omega": 1.5}
    assert (manifest["anchor"], manifest["omega"]) == ("none", 1.5)

    masked = run_cell(make_cfg("method=cfg", "method.negative=masked", "method.guidance_scale=1.3", "experiment_name=unit"))
    assert masked == runs / "cfg" / "nl" / "guidance_scale=1.3"
    spa_cell = run_cell(make_cfg("spa.omega=1.3", "experiment_name=unit"))
    assert spa_cell == runs / "nl" / "omega=1.3", "SPA's cells keep their layout"

    def programs(path):
        return [(s["task_id"], s["completion"]) for s in read_lines(path / "samples.jsonl")]

    assert programs(masked) == programs(spa_cell)

    cad = run_cell(make_cfg("method=cad", "experiment_name=unit"))
    assert cad == runs / "cad" / "nl" / "alpha=0.5"
    assert json.loads((cad / "manifest.json").read_text())["method"] == {"name": "cad", "alpha": 0.5, "omega": 1.5}
    for sample in read_lines(cad / "samples.jsonl"):
        assert sample["n_masked_prompt_tokens"] < sample["n_prompt_tokens"], "the NL is deleted, not masked in place"


def test_cad_deletes_exactly_the_anchored_text(make_cfg):
    from eval.runner import load_tokenizer, plan_cell, prepare_inputs
    from spa.masking import replace_spans

    cfg = make_cfg("method=cad", "benchmark=mbpp")
    plan = plan_cell(cfg)
    assert plan.masking == "delete" and plan.omega == 1.5 and plan.settings.method == {"name": "cad", "alpha": 0.5}
    tokenizer = load_tokenizer(cfg)
    protocol, tasks, inputs = prepare_inputs(cfg, plan, ["Mbpp/2"], tokenizer)
    task = inputs["Mbpp/2"]
    deleted = replace_spans(task.prompt_text, task.anchor_spans, "")
    assert task.anchored_text and task.masked_prompt_text == deleted
    assert task.masked_input_ids == protocol.tokenize(deleted)[0] and len(task.masked_input_ids) < len(task.input_ids)


@pytest.mark.parametrize("method", [["method=cfg", "method.guidance_scale=1"], ["method=cad", "method.alpha=0"]])
def test_every_method_at_its_plain_strength_is_the_plain_models_cell(make_cfg, tmp_path, method):
    from eval.runner import plan_cell

    plain = plan_cell(make_cfg("spa.omega=1.0"))
    plan = plan_cell(make_cfg(*method))
    assert plan.path == plain.path == tmp_path / "runs" / "default" / "tiny" / "humaneval" / "evalplus" / "none" / "omega=1.0"
    assert plan.settings == plain.settings, "one cell, one fingerprint, whichever method asks for it"
    assert plan.generation_path == plain.generation_path and plain.settings.method == {"name": "spa", "omega": 1.0}


@pytest.mark.parametrize("overrides, message", [
    (["method=cad", "spa.masking=token"], r"spa.masking='token' is a setting of SPA and has no effect with method=cad"),
    (["method=cfg", "spa.modulated_by_prob=true"], "spa.modulated_by_prob=True is a setting of SPA"),
    (["method=cad", "anchor=none"], "has nothing to take away from the prompt"),
    (["method=cfg", "method.negative=masked", "anchor=none"], "or use method.negative=last_token"),
    (["method=cfg", "method.negative=empty"], "method.negative='empty' is not a CFG negative prompt"),
    (["method=cad", "method.alpha=abc"], "method.alpha must be a finite number, got 'abc'"),
    (["method=cfg", "method.guidance_scale=inf"], "method.guidance_scale must be a finite number"),
])
def test_invalid_method_combinations(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        run_cell(make_cfg(*overrides))
    assert "\n" not in str(error.value)


def test_masked_cfg_takes_spas_masking_settings(make_cfg):
    from eval.runner import plan_cell

    plan = plan_cell(make_cfg("method=cfg", "method.negative=masked", "spa.masking=attention"))
    assert plan.masking == "attention" and plan.settings.masking == "attention"


def test_attention_runs_are_spa_only(tmp_path, model_cache, data_dir):
    from eval.runner import run_attention_cell

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("attention", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}",
                                              f"paths.data_dir={data_dir}", "method=cad"])
    with pytest.raises(ConfigError, match="measures attention under SPA only"):
        run_attention_cell(cfg)


# ---- Shared generations, parallel jobs, frictions (README "Sweeps on a cluster") -------------------


def test_another_experiment_reuses_the_generation(make_cfg, tmp_path):
    first = run_cell(make_cfg("spa.omega=1.3", "experiment_name=one"))
    second = run_cell(make_cfg("spa.omega=1.3", "experiment_name=two", "generation.batch_size=2"))
    assert first.parent.parent.parent.parent.parent.name == "one" and second != first
    shared = (first / "samples.jsonl").resolve()
    assert shared == (second / "samples.jsonl").resolve() and shared.parent.parent.parent.parent.parent == tmp_path / "cells"
    store = json.loads((shared.parent / "manifest.json").read_text())
    assert [(r["experiment"], r["tasks"], r["batch_size"]) for r in store["runs"]] == [("one", 3, 16)], "generated once"
    assert store["settings"]["omega"] == 1.3 and store["runs"][0]["git"]["commit"]
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["generation_store"]["generated_by"] == ["one"] and manifest["generation_store"]["generated_here"] == 0
    assert manifest["config"]["generation"]["batch_size"] == 2, "batch size is recorded, not part of the key"


def test_ctrl_c_prints_one_line_and_the_rerun_resumes(make_cfg, monkeypatch, capsys):
    from eval import runner
    from eval.cli import exit_on_harness_error

    real, calls = runner.decode_inputs, []

    def interrupted_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "decode_inputs", interrupted_in_the_second_batch)
    cfg = make_cfg("spa.omega=1.3", "generation.batch_size=1")
    with pytest.raises(SystemExit) as stop, exit_on_harness_error():
        run_cell(cfg)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: 1 of 3 tasks of ") and "rerun the same command to resume" in err
    monkeypatch.undo()
    path = run_cell(cfg)
    assert "resuming: 1 of 3 tasks done" in capsys.readouterr().out
    assert [s["task_id"] for s in read_lines(path / "samples.jsonl")] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


@pytest.mark.parametrize("argument, suggestion", [("omega=1.3", "spa.omega"), ("+omega=1.7", "spa.omega"),
                                                  ("generation.max_tokens=5", "generation.max_new_tokens")])
def test_a_setting_nothing_reads_is_refused_from_any_directory(argument, suggestion, tmp_path, data_dir):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "run.py"), argument, f"paths.data_dir={data_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"Unknown setting '{argument.lstrip('+').partition('=')[0]}'" in result.stderr and suggestion in result.stderr
    assert "Known keys: model.*" in result.stderr and "limit" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_paths_are_taken_from_the_project_root(monkeypatch, tmp_path):
    from eval.cli import CONFIG_DIR as configs  # registers the project_path resolver
    from eval.runner import plan_cell

    monkeypatch.delenv("SPA_RESULTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("run", overrides=["spa.omega=1.3"], return_hydra_config=True)
    plan = plan_cell(cfg)  # reads the data folder, relative to the project root by default
    assert plan.path.is_relative_to(REPO_ROOT / "results" / "runs")
    assert plan.generation_path.is_relative_to(REPO_ROOT / "results" / "cells")
    assert cfg.hydra.sweep.dir == str(REPO_ROOT / "results" / "sweeps" / "default")
    assert list(tmp_path.iterdir()) == []


def test_parallel_sweep_shares_cells_and_builds_caches_once(tmp_path, data_dir):
    """The issue's failure: submitit_local jobs, four anchors at omega 1 and 1.3 on the tiny model (built by the jobs
    themselves in a fresh cache), five cells between eight jobs. Every job succeeds and every cell is generated once;
    a second experiment over the same settings generates nothing."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    common = [f"paths.results_dir={results}", f"paths.cache_dir={cache}", f"paths.data_dir={data_dir}", "limit=2",
              "evaluate=false", "generation.max_new_tokens=4"]
    sweep = subprocess.run(
        [sys.executable, "scripts/run.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
         "experiment_name=race", "anchor=nl,nl+test,nl+code,nl+code+test", "spa.omega=1.0,1.3", *common],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    cells = sorted(p.parent for p in (results / "runs" / "race").rglob("manifest.json"))
    assert {c.relative_to(results / "runs" / "race" / "tiny" / "humaneval" / "evalplus").as_posix() for c in cells} == {
        "nl+code+test/omega=1.3", "nl+code/omega=1.3", "nl+test/omega=1.3", "nl/omega=1.3", "none/omega=1.0"}
    generations = sorted(p.parent for p in (results / "cells").rglob("manifest.json"))
    assert len(generations) == 5
    for generation in generations:
        store = json.loads((generation / "manifest.json").read_text())
        assert [r["tasks"] for r in store["runs"]] == [2], f"{generation} generated once"
        assert [s["task_id"] for s in read_lines(generation / "samples.jsonl")] == ["HumanEval/0", "HumanEval/1"]
    for cell in cells:
        manifest = json.loads((cell / "manifest.json").read_text())
        assert manifest["status"] == "generated" and manifest["task_ids"] == ["HumanEval/0", "HumanEval/1"]
    assert not list(cache.glob("models/*.tmp*")), "the tiny model was built aside and renamed into place"

    for overrides in (["anchor=nl", "spa.omega=1.3"], ["anchor=nl+test", "spa.omega=1.0"]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            again = run_cell(compose("run", overrides=[*common, "experiment_name=again", *overrides]))
        assert json.loads((again / "manifest.json").read_text())["generation_store"]["generated_here"] == 0
    assert sorted(p.parent for p in (results / "cells").rglob("manifest.json")) == generations
    assert all(len(json.loads((g / "manifest.json").read_text())["runs"]) == 1 for g in generations)


def cell_samples(path):
    return [{k: v for k, v in s.items()} for s in read_lines(path / "samples.jsonl")]


GROUP = [["anchor=nl", "spa.omega=1.3"], ["anchor=nl", "spa.omega=1.0"], ["anchor=nl+test", "spa.omega=1.3"],
         ["anchor=nl+test", "spa.omega=0.0"], ["anchor=nl", "spa.omega=1.6"], ["method=cfg", "method.negative=masked", "method.guidance_scale=1.3"]]


def test_a_group_job_gives_each_cell_the_samples_it_gets_alone(make_cfg, monkeypatch, tmp_path):
    """One model load, every cell's rows in the same batches and shared prefills: the samples of each cell are
    those of the cell run on its own (greedy, token for token), and resuming a group decodes only what is missing."""
    from eval import runner

    # Another results tree: the group must decode, not reuse these generations.
    alone = [run_cell(make_cfg(*cell, f"paths.results_dir={tmp_path}/alone", "limit=4")) for cell in GROUP]
    loads, real_load = [], runner.load
    monkeypatch.setattr(runner, "load", lambda cfg: loads.append(1) or real_load(cfg))
    runner.run_group([make_cfg(*GROUP[0], "experiment_name=group", "limit=2")])  # a cell already half there
    calls, real = [], runner.decode_inputs
    monkeypatch.setattr(runner, "decode_inputs", lambda *args, **kwargs: calls.append(len(args[2])) or real(*args, **kwargs))
    together = runner.run_group([make_cfg(*cell, "experiment_name=group", "limit=4", "generation.batch_size=6") for cell in GROUP])
    assert [p.parts[-5:] for p in together] == [p.parts[-5:] for p in alone]
    for one, group in zip(alone, together):
        assert read_lines(group / "samples.jsonl") == read_lines(one / "samples.jsonl"), group
    assert len(loads) == 2, "the model is loaded once per group job"
    # The first cell had 2 of its 4 tasks: 2 + 5 * 4 rows, in full batches of 6 sequences.
    assert calls == [6, 6, 6, 4]
    assert runner.run_group([make_cfg(*cell, "experiment_name=group", "limit=4") for cell in GROUP]) == together
    assert calls == [6, 6, 6, 4], "a finished group decodes nothing"


def test_shards_merge_into_the_unsharded_cell_evaluated_once(make_cfg, monkeypatch, tmp_path):
    import eval.execution.evaluate as evaluate

    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate_samples", lambda benchmark, samples, **kwargs: evaluated.append(
        [s["task_id"] for s in samples]) or {"pass@1": {"base": 0.0, "plus": 0.0}, "tasks": {}})
    whole = run_cell(make_cfg("spa.omega=1.3", f"paths.results_dir={tmp_path}/whole", "limit=5"))  # not reused by the shards
    assert len(evaluated) == 0, "evaluate=false"
    shard = lambda i: make_cfg("spa.omega=1.3", "experiment_name=sharded", "limit=5", "evaluate=true", "shards=2", f"shard={i}")  # noqa: E731
    path = run_cell(shard(1))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["missing_tasks"] == 3 and not evaluated
    assert [s["task_id"] for s in read_lines(path / "samples.jsonl")] == ["HumanEval/1", "HumanEval/3"]
    run_cell(shard(0))
    assert evaluated == [["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3", "HumanEval/4"]], "the last shard evaluates"
    assert json.loads((path / "manifest.json").read_text())["status"] == "complete"
    merged = sorted(read_lines(path / "samples.jsonl"), key=lambda s: s["task_id"])
    assert merged == read_lines(whole / "samples.jsonl")
    store = json.loads(((path / "samples.jsonl").resolve().parent / "manifest.json").read_text())
    assert [(r["shard"], r["shards"], r["tasks"]) for r in store["runs"]] == [(1, 2, 2), (0, 2, 3)]
    run_cell(shard(1))
    assert len(evaluated) == 1, "a complete cell is not evaluated again"


def test_parallel_shards_and_evaluate_cells(make_cfg, tmp_path, model_cache, data_dir):
    """Two shards in parallel processes write one generation safely; scripts/evaluate_cells.py evaluates complete,
    unevaluated cells (here: generated with evaluate=false)."""
    common = [f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}", f"paths.data_dir={data_dir}", "limit=4",
              "evaluate=false", "generation.max_new_tokens=6", "generation.batch_size=1", "spa.omega=1.3", "experiment_name=par"]
    run = lambda *extra: subprocess.Popen([sys.executable, "scripts/run.py", *common, *extra], cwd=REPO_ROOT,  # noqa: E731
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = [run("shards=2", f"shard={i}") for i in (0, 1)]
    for process in shards:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    path = tmp_path / "runs" / "par" / "tiny" / "humaneval" / "evalplus" / "nl" / "omega=1.3"
    assert sorted(s["task_id"] for s in read_lines(path / "samples.jsonl")) == [f"HumanEval/{i}" for i in range(4)]
    assert json.loads((path / "manifest.json").read_text())["status"] == "generated"
    alone = run_cell(make_cfg("spa.omega=1.3", f"paths.results_dir={tmp_path}/alone", "limit=4"))
    assert sorted(read_lines(path / "samples.jsonl"), key=lambda s: s["task_id"]) == read_lines(alone / "samples.jsonl")
    listed = subprocess.run([sys.executable, "scripts/evaluate_cells.py", str(tmp_path / "runs"), "--dry-run"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert f"to evaluate: {path}" in listed.stdout and "1 cells to evaluate" in listed.stdout


@pytest.mark.parametrize("arguments, message", [
    (["shards=2", "shard=2"], "shards=2 shard=2: shards must be an integer >= 1"),
    (["shards=0"], "shards=0 shard=0: shards must be an integer >= 1"),
    (["shards=2", "force=true"], "force=true with shards=2"),
    (["-m", "grouping=cells", "spa.omega=1.0,1.3"], "grouping='cells' is not one of model_benchmark, cell"),
])
def test_bad_shards_exit_2(arguments, message, tmp_path, data_dir):
    result = subprocess.run([sys.executable, "scripts/run.py", *arguments, f"paths.results_dir={tmp_path}", f"paths.data_dir={data_dir}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_sweep_runs_as_group_jobs_through_hydra(tmp_path, model_cache, data_dir, make_cfg):
    """`run.py -m` with the basic launcher: one job for the model and benchmark, holding every cell, each cell's samples
    those of the cell run alone."""
    common = [f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}", f"paths.data_dir={data_dir}", "limit=2",
              "evaluate=false", "generation.max_new_tokens=6"]
    result = subprocess.run([sys.executable, "scripts/run.py", "-m", *common, "experiment_name=swept", "anchor=nl,nl+test",
                             "spa.omega=1.0,1.3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tiny humaneval evalplus: 3 cells" in result.stderr, "one job decodes the three cells together"
    for anchor, omega in [("nl", "1.3"), ("nl+test", "1.3"), ("none", "1.0")]:
        swept = tmp_path / "runs" / "swept" / "tiny" / "humaneval" / "evalplus" / anchor / f"omega={omega}"
        alone = run_cell(make_cfg(f"anchor={anchor if anchor != 'none' else 'nl'}", f"spa.omega={omega}", "experiment_name=alone", "limit=2"))
        assert read_lines(swept / "samples.jsonl") == read_lines(alone / "samples.jsonl")
