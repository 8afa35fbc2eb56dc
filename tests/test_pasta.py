"""PASTA (spa.pasta, method=pasta): steered attention weights against the formula, decoding against a brute-force
reference, alpha = 1 against the plain model, the method's cells and tables, and the head profiling script."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import spa
from spa import pasta
from spa.errors import ConfigError
from tests.conftest import make_tiny_model

VOCAB = 97
ARCHITECTURES = ("llama", "codegen")


def tiny(architecture: str, attention: str = "eager"):
    """A tiny model in float64; Llama's eager attention in float32, since in float64 its float32 softmax turns the
    padding rows of a left-padded batch into NaN (transformers' behaviour, see spa.engine)."""
    model = make_tiny_model(architecture)
    if architecture != "codegen":
        model.set_attn_implementation(attention)
    return model.float() if (architecture, attention) == ("llama", "eager") else model


def prompts_and_spans(lengths, seed=3):
    """Random prompts, each with its own emphasized stretch (as an anchored NL sentence inside a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    masks = [[(n // 3 + i % 2) <= j < (2 * n) // 3 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    return prompts, masks


HEADS = {0: (1, 3), 1: (2,)}  # layer 0: two of four heads, layer 1: one


def left_padded(prompts):
    batch = spa.views.build_views(prompts, views=("original",))
    return batch.input_ids, batch.attention_mask, batch.position_ids


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_steered_attention_weights_equal_the_formula(architecture):
    """Every layer's steered weights against a_ij * s_j / sum_k a_ik s_k computed from the plain weights of the same
    layer inputs (s_j = alpha on prompt keys outside the emphasized text); other heads and layers bit for bit."""
    model = tiny(architecture)
    prompts, masks = prompts_and_spans([11, 7])
    ids, attention, positions = left_padded(prompts)
    alpha = 0.05
    modules = pasta._attention_modules(model, {0: (), 1: ()})
    inputs = {}
    captures = [module.register_forward_pre_hook(lambda m, a, k, layer=layer: inputs.__setitem__(layer, dict(k)), with_kwargs=True, prepend=True)
                for layer, module in modules.items()]
    with torch.no_grad(), pasta.steer(model, masks, alpha, HEADS) as steering:
        steering.prepare([(0, 0), (1, 0)], attention)
        steered = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False, output_attentions=True).attentions
    for handle in captures:
        handle.remove()
    width = ids.shape[1]
    scale = torch.ones(2, width, dtype=torch.float64)
    for row, (prompt, mask) in enumerate(zip(prompts, masks)):
        pad = width - len(prompt)
        for j, emphasized in enumerate(mask):
            if not emphasized:
                scale[row, pad + j] = alpha
    real_queries = attention.bool()
    with torch.no_grad():
        for layer, module in modules.items():
            plain = module(**inputs[layer])[1]
            expected = plain.clone()
            for head in HEADS[layer]:
                weighted = plain[:, head] * scale[:, None, :]
                expected[:, head] = weighted / weighted.sum(-1, keepdim=True)
            for row in range(2):
                got, want = steered[layer][row][:, real_queries[row]], expected[row][:, real_queries[row]]
                # transformers' eager softmax runs in float32 (even for this float64 model): float32's precision.
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
                unsteered = [h for h in range(4) if h not in HEADS[layer]]
                assert torch.equal(got[unsteered], plain[row][:, real_queries[row]][unsteered]), "unselected heads are unchanged"
            assert not torch.allclose(steered[layer][:, list(HEADS[layer])], plain[:, list(HEADS[layer])]), "the steering acts"


def pastalib_hooks(model, emphasized, alpha, heads):
    """pastalib's own edit (``edit_multisection_attention``, scale_position="exclude") for ONE unpadded prompt: the
    eager float mask expanded to every head, log(alpha) added to the columns outside the emphasized tokens, up to the
    prompt's length. CodeGen adds the mask before dividing by sqrt(head_dim): its constant is scaled by that."""
    n_heads = model.config.num_attention_heads
    outside = [j for j, e in enumerate(emphasized) if not e]

    def edit(layer):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            mask = mask.expand(mask.shape[0], n_heads, *mask.shape[2:]).clone()
            constant = math.log(alpha) * (module.scale_attn if model.config.model_type == "codegen" else 1.0)
            for head in heads[layer]:
                mask[0, head, :, outside] += constant
            return args, {**kwargs, "attention_mask": mask}
        return hook

    return [module.register_forward_pre_hook(edit(layer), with_kwargs=True) for layer, module in pasta._attention_modules(model, heads).items()]


@torch.no_grad()
def brute_force_decode(model, prompt, emphasized, alpha, heads, max_new_tokens, eos=None):
    """Greedy, the whole sequence recomputed without a cache at every step, eager attention, pastalib's mask edit."""
    handles = pastalib_hooks(model, emphasized, alpha, heads)
    generated = []
    try:
        for _ in range(max_new_tokens):
            sequence = torch.tensor([prompt + generated])
            # An explicit all-ones mask: transformers then builds the eager float mask pastalib edits.
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits[0, -1]
            generated.append(int(logits.argmax()))
            if generated[-1] == eos:
                break
    finally:
        for handle in handles:
            handle.remove()
    return generated


@pytest.mark.parametrize("architecture, attention", [("llama", "eager"), ("llama", "sdpa"), ("codegen", "eager")])
def test_decode_equals_brute_force_reference(architecture, attention):
    """Batched and left-padded, with the KV cache, rows leaving the batch as they finish (per-prompt budgets and an
    EOS id), against pastalib's edit recomputed without any cache, token for token."""
    model = tiny(architecture, attention)
    prompts, masks = prompts_and_spans([13, 6, 10])
    budgets = [12, 5, 9]
    reference_model = tiny(architecture, "eager")
    expected = [brute_force_decode(reference_model, p, m, 0.01, HEADS, b) for p, m, b in zip(prompts, masks, budgets)]
    eos = expected[0][3]  # the first prompt stops early at this id; others may too
    expected = [brute_force_decode(reference_model, p, m, 0.01, HEADS, b, eos=eos) for p, m, b in zip(prompts, masks, budgets)]
    out = pasta.decode(model, prompts, masks, alpha=0.01, heads=HEADS, max_new_tokens=budgets, eos_token_id=eos)
    assert out == expected
    assert pasta.decode(model, prompts, masks, alpha=0.01, heads=HEADS, max_new_tokens=budgets, eos_token_id=eos, batch_size=1) == expected
    plain = spa.decode(model, prompts, omega=1.0, max_new_tokens=budgets, eos_token_id=eos)
    assert out != plain, "the comparison would be vacuous if steering never changed a token"


@pytest.mark.parametrize("architecture, attention", [("llama", "eager"), ("llama", "sdpa"), ("codegen", "eager")])
def test_alpha_one_is_the_plain_model(architecture, attention):
    model = tiny(architecture, attention)
    prompts, masks = prompts_and_spans([9, 14, 5])
    plain = spa.decode(model, prompts, omega=1.0, max_new_tokens=10)
    assert pasta.decode(model, prompts, masks, alpha=1.0, heads="all", max_new_tokens=10) == plain
    if attention == "eager":  # the bias is exactly 0: the same scores, bit for bit
        ids, mask, positions = left_padded(prompts)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            with pasta.steer(model, masks, 1.0, "all") as steering:
                steering.prepare([(0, 0), (1, 0), (2, 0)], mask)
                assert torch.equal(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, expected)


def test_head_sets():
    config = make_tiny_model("llama").config  # 2 layers of 4 heads
    assert pasta.resolve_heads(config, "all") == {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}
    assert pasta.resolve_heads(config, {"last_k_layers": 1}) == {1: (0, 1, 2, 3)}
    assert pasta.resolve_heads(config, {"1": [3, 0, 3]}) == {1: (0, 3)}, "pastalib's JSON head_config"
    for heads, message in ((("some"), "Unknown PASTA head set 'some'"), ({"last_k_layers": 3}, "last_k_layers=3 is not"),
                           ({"5": [0]}, "does not name heads of this model"), ({"0": [4]}, "does not name heads")):
        with pytest.raises(ConfigError, match=message) as error:
            pasta.resolve_heads(config, heads)
        assert "\n" not in str(error.value)


def test_bad_input_is_refused():
    model = tiny("llama")
    prompts, masks = prompts_and_spans([5])
    for alpha in (0, -0.5, math.inf):
        with pytest.raises(ConfigError, match=r"alpha=.* must be a finite number > 0"):
            pasta.decode(model, prompts, masks, alpha=alpha, heads="all", max_new_tokens=2)
    with pytest.raises(ConfigError, match="PASTA is implemented for llama, codegen models"):
        pasta.decode(make_tiny_model("gpt2"), prompts, masks, alpha=0.1, heads="all", max_new_tokens=2)


# ---- method=pasta: cells, tables, head profiles ------------------------------------------------------

from hydra import compose, initialize_config_dir  # noqa: E402

from eval.cli import CONFIG_DIR  # noqa: E402
from eval.runner import plan_cell, run_cell  # noqa: E402
from tests.test_report import FAST, outcomes, row, table, write_cell  # noqa: E402
from tests.test_runner import make_cfg, model_cache  # noqa: E402,F401 - fixtures


def test_pasta_cells_layout_resume_and_plain_strength(make_cfg, tmp_path):
    cfg = make_cfg("method=pasta", "method.heads={last_k_layers: 1}", "experiment_name=unit")
    path = run_cell(cfg)
    assert path == tmp_path / "runs" / "unit" / "tiny" / "humaneval" / "evalplus" / "pasta" / "nl" / "alpha=0.01"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"] == {"name": "pasta", "alpha": 0.01, "heads": {"last_k_layers": 1}, "omega": 0.01}
    assert (manifest["anchor"], manifest["omega"]) == ("nl", 0.01)
    samples_file = path / "samples.jsonl"
    full = samples_file.read_bytes()
    lines = full.decode().splitlines(keepends=True)
    samples_file.write_text("".join(lines[:2]) + lines[2][:25])  # a crash while writing the third task
    with pytest.warns(UserWarning, match="truncated last line"):
        run_cell(cfg)
    assert samples_file.read_bytes() == full, "finished tasks are kept and the lost one is redone identically"
    plain = plan_cell(make_cfg("spa.omega=1.0"))
    at_one = plan_cell(make_cfg("method=pasta", "method.alpha=1", "method.heads=all"))
    assert at_one.path == plain.path and at_one.settings == plain.settings, "alpha = 1 is the plain model's one cell"


def write_profile_file(path, model="tiny", hf_id=None, heads=None):
    from eval.methods import HEAD_PROFILE_FORMAT

    path.write_text(json.dumps({"format": HEAD_PROFILE_FORMAT, "model": {"name": model, "hf_id": hf_id, "revision": None},
                                "heads": heads or {"1": [0, 2]}}))
    return path


@pytest.mark.parametrize("overrides, message", [
    (["method.alpha=0"], "method.alpha=0 must be > 0 for PASTA"),
    (["method.alpha=-1"], "method.alpha=-1 must be > 0 for PASTA"),
    (["method.heads=some"], "method.heads='some' is not a PASTA head set"),
    (["method.heads={last_k_layers: 0}"], "last_k_layers=0 must be a number of layers"),
    (["method.heads=all", "anchor=none"], "has no text to emphasize"),
    (["method.heads=all", "spa.omega=1.3"], "spa.omega=1.3 is a setting of SPA and has no effect with method=pasta"),
    (["method.heads=missing/heads.json"], "PASTA head profile 'missing/heads.json' does not exist"),
    (["+method.negative=masked"], "method=pasta has no setting method.negative"),
])
def test_invalid_pasta_settings(make_cfg, overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as error:
        run_cell(make_cfg("method=pasta", *overrides))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_a_head_profile_of_another_model_is_refused(make_cfg, tmp_path):
    other = write_profile_file(tmp_path / "other.json", model="codellama-7b", hf_id="codellama/CodeLlama-7b-hf")
    with pytest.raises(ConfigError, match="was made for model .*codellama-7b.* not for this run's .*tiny") as error:
        run_cell(make_cfg("method=pasta", f"method.heads={other}"))
    assert "\n" not in str(error.value)
    hf_id = plan_cell(make_cfg()).settings.model["hf_id"]
    mine = write_profile_file(tmp_path / "mine.json", hf_id=hf_id, heads={"1": [7]})  # the tiny model has 4 heads
    with pytest.raises(ConfigError, match="does not name heads of this model"):
        run_cell(make_cfg("method=pasta", f"method.heads={mine}"))


def profile_cfg(tmp_path, model_cache, data_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("pasta_profile", overrides=[f"paths.results_dir={tmp_path}", f"paths.cache_dir={model_cache}",
                                                   f"paths.data_dir={data_dir}", *overrides])


def test_profile_writes_a_head_set_with_provenance_that_a_cell_uses(tmp_path, model_cache, data_dir, make_cfg):
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("pasta_profile", REPO_ROOT / "scripts" / "pasta_profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for ids, bad in (("[11]", "[11]"), ("[600,12,510]", "[12, 510]")):
        with pytest.raises(ConfigError, match=rf"MBPP ids {re.escape(bad)} are in the test split") as error:
            script.write_profile(profile_cfg(tmp_path, model_cache, data_dir, f"profile.task_ids={ids}"))
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="test split"):
        script.write_profile(profile_cfg(tmp_path, model_cache, data_dir, "profile.split=test"))
    assert not (tmp_path / "pasta").exists()

    script.write_profile(profile_cfg(tmp_path, model_cache, data_dir, "profile.task_ids=[511,601,3]", "profile.top_k=3"))
    profile = json.loads((tmp_path / "pasta" / "tiny" / "heads.json").read_text())
    assert sum(map(len, profile["heads"].values())) == 3 and len(profile["ranking"]) == 8  # 2 layers x 4 heads
    gains = [r["gain"] for r in profile["ranking"]]
    assert gains == sorted(gains, reverse=True) and len(set(gains)) > 1
    top = {(r["layer"], r["head"]) for r in profile["ranking"][:3]}
    assert top == {(int(layer), head) for layer, heads in profile["heads"].items() for head in heads}
    provenance = profile["provenance"]
    assert provenance["dataset"]["task_ids"] == [511, 601, 3] and len(provenance["dataset"]["sha256"]) == 64
    assert provenance["git"]["commit"] and provenance["packages"]["transformers"] and provenance["config"]["profile"]["top_k"] == 3
    assert profile["model"]["name"] == "tiny" and profile["model"]["hf_id"].endswith("tiny-deepseek-llama")

    path = run_cell(make_cfg("method=pasta", "limit=2"))  # method.heads' default: the model's profile
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"]["heads"] == profile["heads"] and manifest["method"]["heads_profile"].endswith("pasta/tiny/heads.json")


def test_pasta_cells_in_the_method_tables(tmp_path):
    from eval.report import aggregate, load_runs

    runs = tmp_path / "runs"
    n = 40
    write_cell(runs, "baselines", "tiny", "humaneval", "none", 1.0, outcomes(n, range(10)))
    write_cell(runs, "baselines", "tiny", "humaneval", "nl", 1.3, outcomes(n, range(20)))
    for alpha, passing in ((0.01, 30), (0.1, 22)):
        write_cell(runs, "baselines", "tiny", "humaneval", "nl", alpha, outcomes(n, range(passing)), method="pasta")
    pasta_cell = next(c for c in load_runs(runs).cells if c.method == "pasta")
    assert pasta_cell.path.relative_to(runs).parts[4:] == ("pasta", "nl", f"alpha={pasta_cell.strength}")
    outputs = aggregate(runs, tmp_path / "out", "all", FAST)
    methods = table(outputs, "methods")
    methods = methods[methods.benchmark == "HumanEval"]
    assert list(methods.method) == ["SPA", "PASTA"]
    pasta_row = row(methods, method_key="pasta")
    assert (pasta_row.parameter, pasta_row.strengths, pasta_row.second_view) == ("alpha", "0.01 0.1 1", "NL emphasized")
    assert (pasta_row.cv_strength, pasta_row.pass_at_1, pasta_row.gain, pasta_row.vs_spa_gain) == pytest.approx((0.01, 75.0, 50.0, 25.0))
    strength = table(outputs, "methods_strength")
    points = strength[(strength.method_key == "pasta") & (strength.benchmark == "HumanEval")]
    assert list(zip(points.strength, points.weight)) == [(0.01, 0.01), (0.1, 0.1), (1.0, 1.0)], "alpha is PASTA's weight"
    assert list(points.pass_at_1) == pytest.approx([75.0, 55.0, 25.0])
    assert set(strength.method) == {"SPA (NL masked)", "PASTA (NL emphasized)"}
