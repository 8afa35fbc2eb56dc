"""PASTA's head selection ("model profiling", Zhang et al. 2023, section 3.2) for one model, on held-out MBPP tasks.

    python scripts/pasta_profile.py model=deepseek-coder-6.7b-instruct         # -> results/pasta/<model>/heads.json
    python scripts/pasta_profile.py model=tiny profile.task_ids=[511,512] profile.top_k=4

Every attention head is steered on its own (``profile.alpha``, the anchored text of the run's ``anchor`` emphasized,
prompts rendered by the run's protocol) and scored by the change in the mean per-token log-likelihood of each task's
reference code after its prompt, over the plain model; the ``top_k`` heads with the largest gains are the head set.
One teacher-forced forward per head and batch of tasks: layers x heads x tasks / batch forwards in all. MBPP's test
split (ids 11-510) is refused. The file holds the head set (pastalib's head_config: layer -> heads), the whole ranking
and the provenance (resolved config, git commit, package versions, model id and revision, dataset hash, task ids).
"""

from __future__ import annotations

import hashlib
import json
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from eval.cli import exit_on_harness_error, run_main
from eval.errors import ConfigError
from eval.experiments.settings import project_path
from eval.methods import HEAD_PROFILE_FORMAT, PROFILE_MODEL_KEYS
from eval.runner import build_protocol, load
from eval.store import git_commit, machine, package_versions, python_command, write_json_atomic
from spa import pasta
from spa.views import build_views

SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}


def held_out_ids(settings) -> list[int]:
    """The MBPP ids to profile on; any of the test split is refused."""
    if settings.task_ids:
        ids = [int(i) for i in settings.task_ids]
    elif settings.split in SPLITS:
        ids = list(SPLITS[settings.split])[: settings.limit or None]
    else:
        raise ConfigError(f"profile.split={settings.split!r} is not an MBPP split; use validation, train or prompt.")
    tested = [i for i in ids if i in SPLITS["test"]]
    if tested:
        raise ConfigError(
            f"MBPP ids {tested[:5]} are in the test split (11-510), on which every method is evaluated; profiling on them "
            "would select heads on the test set. Use held-out tasks: profile.split=validation (511-600), train (601-974) "
            "or profile.task_ids outside 11-510."
        )
    return ids


def held_out_tasks(path, ids: list[int]) -> tuple[list[dict], str]:
    """(tasks in EvalPlus's MBPP form with their reference code, the sha256 of the dataset file)."""
    data = project_path(path).read_bytes()
    rows = {row["task_id"]: row for row in map(json.loads, filter(None, data.decode("utf-8").splitlines()))}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ConfigError(f"MBPP ids {missing[:5]} are not in {path} (it holds ids 1-974).")
    tasks = [{"task_id": f"Mbpp/{i}", "prompt": f'"""\n{rows[i]["text"]}\n{rows[i]["test_list"][0]}\n"""',
              "reference": rows[i]["code"].replace("\r\n", "\n")} for i in ids]
    return tasks, hashlib.sha256(data).hexdigest()


@torch.inference_mode()
def reference_loglik(model, sequences, prompt_lengths, steering=None) -> torch.Tensor:
    """Per sequence: the mean log-probability of its tokens after the prompt (teacher forcing, one forward)."""
    batch = build_views(sequences, views=("original",), device=model.get_input_embeddings().weight.device)
    if steering is not None:
        steering.prepare([(i, 0) for i in range(len(sequences))], batch.attention_mask)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    width = batch.input_ids.shape[1]
    scores = []
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        start = width - len(sequence) + prompt_length  # the first reference token's column
        scores.append(logprobs[row, start - 1 :].mean())
    return torch.stack(scores)


def profile_heads(model, prompts, masks, references, alpha: float, batch_size: int) -> list[dict]:
    """Every head's mean gain in reference log-likelihood when it alone is steered, best first."""
    n_layers, n_heads = pasta.head_shape(model.config)
    gains = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        sequences = [p + r for p, r in zip(prompts[chunk], references[chunk])]
        lengths = [len(p) for p in prompts[chunk]]
        plain = reference_loglik(model, sequences, lengths)
        for layer in range(n_layers):
            for head in range(n_heads):
                with pasta.steer(model, masks[chunk], alpha, {layer: (head,)}) as steering:
                    gains[layer, head] += (reference_loglik(model, sequences, lengths, steering) - plain).double().sum().cpu()
    gains /= len(prompts)
    ranking = [{"layer": layer, "head": head, "gain": float(gains[layer, head])} for layer in range(n_layers) for head in range(n_heads)]
    return sorted(ranking, key=lambda r: (-r["gain"], r["layer"], r["head"]))


def write_profile(cfg: DictConfig) -> dict:
    settings = cfg.profile
    if cfg.protocol.name != "evalplus":
        raise ConfigError(
            f"pasta_profile renders the held-out MBPP tasks as EvalPlus prompts, not under protocol={cfg.protocol.name}; "
            "use protocol=evalplus (the head set it writes is the model's, for either protocol's runs)."
        )
    if not (isinstance(settings.top_k, int) and settings.top_k >= 1):
        raise ConfigError(f"profile.top_k={settings.top_k!r} must be a number of heads >= 1, e.g. profile.top_k=16.")
    if not float(settings.alpha) > 0:
        raise ConfigError(f"profile.alpha={settings.alpha!r} must be > 0 (PASTA's default: 0.01).")
    ids = held_out_ids(settings)
    tasks, dataset_sha256 = held_out_tasks(settings.dataset, ids)
    model, tokenizer = load(cfg)
    protocol = build_protocol(cfg, tokenizer)
    inputs = [protocol.model_inputs(task, "mbpp", cfg.anchor.condition) for task in tasks]
    if not all(any(i.anchor_mask) for i in inputs):
        raise ConfigError(f"anchor={cfg.anchor.condition} anchors nothing in some prompts: PASTA needs text to emphasize (anchor=nl).")
    references = [tokenizer.encode(task["reference"], add_special_tokens=False) for task in tasks]
    started = time.time()
    ranking = profile_heads(model, [i.input_ids for i in inputs], [i.anchor_mask for i in inputs], references,
                            float(settings.alpha), int(settings.batch_size))
    top = ranking[: settings.top_k]
    heads = {str(layer): sorted(r["head"] for r in top if r["layer"] == layer) for layer in sorted({r["layer"] for r in top})}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    profile = {
        "format": HEAD_PROFILE_FORMAT,
        "model": {**{key: model_cfg.get(key) for key in PROFILE_MODEL_KEYS},
                  "resolved_commit": getattr(model.config, "_commit_hash", None), "model_type": model.config.model_type},
        "heads": heads,
        "alpha": float(settings.alpha),
        "top_k": int(settings.top_k),
        "metric": "mean gain in per-token log-likelihood of the reference code after the prompt, the head alone steered",
        "ranking": ranking,
        "provenance": {
            "anchor": cfg.anchor.condition,
            "protocol": cfg.protocol.name,
            "dataset": {"path": str(settings.dataset), "sha256": dataset_sha256, "task_ids": ids},
            "config": OmegaConf.to_container(cfg, resolve=True),
            "command": python_command(),
            "git": git_commit(),
            "packages": package_versions(),
            "machine": machine(),
            "seconds": time.time() - started,
        },
    }
    out = project_path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, profile)
    print(f"{out}: {settings.top_k} heads of {len(ranking)} from {len(ids)} held-out MBPP tasks: {json.dumps(heads)}")
    return profile


@hydra.main(config_path="../configs", config_name="pasta_profile", version_base="1.3")
@exit_on_harness_error()
def main(cfg: DictConfig) -> None:
    write_profile(cfg)


if __name__ == "__main__":
    run_main(main, "pasta_profile")
