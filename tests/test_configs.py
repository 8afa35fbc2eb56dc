"""Every config group option and every experiment preset composes, and its sweep names real options."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eval.cli import CONFIG_DIR, group_options
from eval.runner import resolve_omega
from eval.benchmarks.spans import ANCHOR_CONDITIONS

PAPER_MODELS = ["codegen-350m-mono", "deepseek-coder-1.3b-instruct", "deepseek-coder-6.7b-instruct", "codellama-7b", "deepseek-coder-33b-instruct"]


# Presets of scripts/attention.py compose with its primary config; the others with scripts/run.py's.
ATTENTION_PRESETS = {"attention", "demo_attention"}
# Presets that add cells to another preset's experiment (a method's grid, the demo's baseline cells).
SHARED_EXPERIMENTS = {"baselines_spa": "baselines", "baselines_cfg": "baselines", "baselines_cad": "baselines", "baselines_pasta": "baselines",
                      "demo_baselines": "demo"}


def compose_run(overrides, primary="run"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(primary, overrides=overrides, return_hydra_config=True)


def resolve_all(cfg) -> dict:
    """Resolve every interpolation outside the hydra node (whose job fields exist only at run time)."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in cfg.items() if k != "hydra"}


def test_groups_hold_the_papers_settings():
    assert set(group_options("model")) == {*PAPER_MODELS, "tiny"}
    assert set(group_options("anchor")) == set(ANCHOR_CONDITIONS)
    assert set(group_options("benchmark")) == {"humaneval", "mbpp"}
    assert set(group_options("experiment")) >= {"table1", "omega_sweep", "anchor_ablation", "attention", "demo", "baselines"}
    assert set(group_options("method")) == {"spa", "cfg", "cad", "pasta"}


@pytest.mark.parametrize("model", PAPER_MODELS + ["tiny"])
@pytest.mark.parametrize("benchmark", ["humaneval", "mbpp"])
def test_every_model_composes_with_every_benchmark(model, benchmark):
    cfg = compose_run([f"model={model}", f"benchmark={benchmark}", "spa.omega=paper"])
    resolve_all(cfg)  # every interpolation resolves
    assert cfg.model.name == model
    assert cfg.model.prompt_style in ("base", "instruct")
    omega = resolve_omega(cfg.spa.omega, cfg.model, benchmark)
    assert 1.0 < omega <= 1.6


def test_paper_omegas_match_table3():
    expected = {"codegen-350m-mono": (1.20, 1.35), "deepseek-coder-1.3b-instruct": (1.05, 1.20),
                "deepseek-coder-6.7b-instruct": (1.28, 1.25), "codellama-7b": (1.60, 1.20), "deepseek-coder-33b-instruct": (1.35, 1.30)}
    for model, (humaneval, mbpp) in expected.items():
        cfg = compose_run([f"model={model}"])
        assert (cfg.model.paper_omega.humaneval, cfg.model.paper_omega.mbpp) == (humaneval, mbpp)


@pytest.mark.parametrize("group", ["anchor", "spa", "method", "generation", "quantization"])
def test_every_option_of_every_group_composes(group):
    for option in group_options(group):
        resolve_all(compose_run([f"{group}={option}"]))


@pytest.mark.parametrize("launcher", ["local", "slurm", "submitit_local", "submitit_slurm"])
def test_launchers_compose(launcher):
    cfg = compose_run([f"hydra/launcher={launcher}"])
    assert "_target_" in cfg.hydra.launcher
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_presets_compose_and_sweep_real_options(experiment):
    primary = "attention" if experiment in ATTENTION_PRESETS else "run"
    cfg = compose_run([f"+experiment={experiment}"], primary)
    assert cfg.experiment_name == ("attention" if primary == "attention" else SHARED_EXPERIMENTS.get(experiment, experiment))
    params = cfg.hydra.sweeper.params or {}
    assert params, "every preset defines its sweep"
    for key, values in params.items():
        for value in str(values).split(","):
            if key in ("model", "benchmark", "anchor", "method"):
                assert value in group_options(key), (experiment, key, value)
            elif key == "spa.omega":
                assert value == "paper" or float(value) > 0
            elif key.startswith("method."):
                assert key.removeprefix("method.") in compose_run([f"method={params['method']}"]).method, (experiment, key)
                assert float(value) >= 0
    resolve_all(cfg)


def test_the_baselines_grids_share_one_experiment_and_the_plain_model():
    """Each method's grid of `make baselines` sweeps the base preset's models and benchmarks, and holds its plain point."""
    base = compose_run(["+experiment=baselines"]).hydra.sweeper.params
    plain = {"baselines_spa": ("spa.omega", 1.0), "baselines_cfg": ("method.guidance_scale", 1.0), "baselines_cad": ("method.alpha", 0.0)}
    for preset, (key, neutral) in plain.items():
        params = compose_run([f"+experiment={preset}"]).hydra.sweeper.params
        assert (params.model, params.benchmark) == (base.model, base.benchmark) and len(params.model.split(",")) == 5
        assert params.method == preset.removeprefix("baselines_")
        assert neutral in [float(v) for v in params[key].split(",")]


def test_attention_config_extends_run_with_eager_attention():
    cfg = compose_run(["model=deepseek-coder-6.7b-instruct"], "attention")
    resolve_all(cfg)
    assert cfg.model.attn_implementation == "eager" and cfg.model.hf_id == "deepseek-ai/deepseek-coder-6.7b-instruct"
    assert cfg.generation.max_new_tokens == 400 and cfg.attention.grad_every == 10
