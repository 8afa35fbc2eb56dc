# Selective Prompt Anchoring harness. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA boxes keep the registry's CUDA build of torch; elsewhere the CPU build 2.13.0
# (several GB of CUDA libraries are useless without a GPU). Override with TORCH_SPEC=...
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH_SPEC ?= torch
else
TORCH_SPEC ?= torch==2.13.0
endif
# Offline data shipped beside the checkout (see README "Data").
SPA_DATA_DIR ?= $(abspath ../shared/data)
export SPA_DATA_DIR
# Sweep launcher: local (jobs one after another), submitit_local, or submitit_slurm / slurm
# (configs/hydra/launcher/slurm.yaml: one GPU job per model, benchmark and protocol, its cells decoded together;
# ARGS=grouping=cell: one per cell). SHARDS=N splits every job's tasks among N jobs (one SLURM job array).
# Extra Hydra overrides: ARGS="...".
LAUNCHER ?= local
HYDRA_LAUNCHER := $(if $(filter submitit_slurm slurm,$(LAUNCHER)),slurm,$(LAUNCHER))
ARGS ?=
PYTEST_ARGS ?=
# The protocol `make reproduce` runs: authors (the paper authors' code, as the numbers were produced) or
# evalplus (EvalPlus-standard prompts, stops and releases). README "Protocols".
PROTOCOL ?= authors
SHARDS ?= 1
SHARDING = $(if $(filter-out 1,$(SHARDS)),shards=$(SHARDS) shard='range(0,$(SHARDS))')
SWEEP = $(PY) scripts/run.py -m hydra/launcher=$(HYDRA_LAUNCHER) protocol=$(PROTOCOL) $(SHARDING) $(ARGS)
# DRY_RUN=1: `make reproduce` prints its plan (jobs, cells, generations, what is done, GPU-hours) and runs nothing.
DRY_RUN ?=
PLAN = $(PY) scripts/plan.py protocol=$(PROTOCOL) $(SHARDING) $(ARGS)

.PHONY: help install test bench demo reproduce baselines tables figures clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv/ and install the harness with its dependencies

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,quant]"
	touch $@

test: install  ## run the test suite (CPU, offline)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install  ## decoding and executor benchmarks -> results/bench/*.json
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) scripts/bench_decoding.py
	$(PY) scripts/bench_group.py
	$(PY) scripts/bench_eval.py

demo: install  ## the whole pipeline offline on the tiny random-weight model (minutes, CPU)
	$(PY) scripts/run.py -m +experiment=demo $(ARGS)
	$(PY) scripts/run.py -m +experiment=demo_authors $(ARGS)
	$(PY) scripts/pasta_profile.py model=tiny profile.limit=3 $(ARGS)
	$(PY) scripts/run.py -m +experiment=demo_baselines $(ARGS)
	$(PY) scripts/attention.py -m +experiment=demo_attention $(ARGS)
	$(PY) scripts/aggregate.py

reproduce: install  ## the paper's full grid (GPUs + internet; PROTOCOL=authors|evalplus; LAUNCHER=submitit_slurm; DRY_RUN=1: its plan)
ifeq ($(DRY_RUN),1)
	$(PLAN) +experiment=omega_sweep +experiment=anchor_ablation
	$(PLAN) --config-name attention +experiment=attention
else
	$(SWEEP) +experiment=omega_sweep
	$(SWEEP) +experiment=anchor_ablation
	$(PY) scripts/attention.py -m hydra/launcher=$(HYDRA_LAUNCHER) protocol=$(PROTOCOL) +experiment=attention $(ARGS)
	$(MAKE) tables figures
endif

baselines: install  ## SPA beside CFG, CAD and PASTA: each method's strength grid on the paper's models (GPUs + internet)
	$(SWEEP) +experiment=baselines_spa
	$(SWEEP) +experiment=baselines_cfg
	$(SWEEP) +experiment=baselines_cad
	for model in codegen-350m-mono deepseek-coder-1.3b-instruct deepseek-coder-6.7b-instruct codellama-7b deepseek-coder-33b-instruct; do \
	  $(PY) scripts/pasta_profile.py model=$$model quantization=8bit $(ARGS) || exit 1; done
	$(SWEEP) +experiment=baselines_pasta
	$(MAKE) tables figures

tables: install  ## rebuild the paper's tables from results/runs -> results/tables/
	$(PY) scripts/aggregate.py what=tables

figures: install  ## rebuild the paper's figures from results/runs -> results/figures/
	$(PY) scripts/aggregate.py what=figures

clean:  ## remove the venv and caches (never results/)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
