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
    assert set(group_options("experiment")) >= {"table1", "omega_sweep", "anchor_ablation", "attention", "demo"}


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


@pytest.mark.parametrize("group", ["anchor", "spa", "generation", "quantization"])
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
    assert cfg.experiment_name == ("attention" if primary == "attention" else experiment)
    params = cfg.hydra.sweeper.params or {}
    assert params, "every preset defines its sweep"
    for key, values in params.items():
        for value in str(values).split(","):
            if key in ("model", "benchmark", "anchor"):
                assert value in group_options(key), (experiment, key, value)
            elif key == "spa.omega":
                assert value == "paper" or float(value) > 0
    resolve_all(cfg)


def test_attention_config_extends_run_with_eager_attention():
    cfg = compose_run(["model=deepseek-coder-6.7b-instruct"], "attention")
    resolve_all(cfg)
    assert cfg.model.attn_implementation == "eager" and cfg.model.hf_id == "deepseek-ai/deepseek-coder-6.7b-instruct"
    assert cfg.generation.max_new_tokens == 400 and cfg.attention.grad_every == 10
