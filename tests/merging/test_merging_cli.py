"""`tunelab merge` end to end through the CLI (typer's CliRunner) on the tiny BPE Llama of tests/tiny.py.

Inputs: the tiny model as base, two perturbed "fine-tunes", two PEFT LoRA adapters (different targets),
a tunelab run directory laid out as `tunelab run` leaves it, and a model of another shape. Every merged
tensor is checked against an independent computation (peft's own merge functions and deltas, torch SVD,
a re-implementation of the held-out loss score).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunelab.cli import app

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
runner = CliRunner()
PROJ = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def _perturbed(sd, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _save(sd, path, base_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir)
    m.load_state_dict(sd, strict=False)
    m.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge_cli")
    p = {"base": tiny_model_dir}
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, seed, scale in [("ft1", 1, 0.01), ("ft2", 2, 0.01), ("noisy", 3, 0.2)]:
        p[name] = root / name
        _save(_perturbed(base, seed, scale), p[name], tiny_model_dir)
    p["mirror"] = root / "mirror"  # base - (noisy - base): the mean of noisy and mirror is the base
    noisy = load_file(str(p["noisy"] / "model.safetensors"))
    _save({k: 2 * base[k] - noisy[k] for k in base}, p["mirror"], tiny_model_dir)
    for name, targets, seed in [("ad1", ["q_proj", "v_proj"], 7), ("ad2", ["q_proj", "up_proj"], 8)]:
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, prm in pm.named_parameters():
                if "lora_B" in n:
                    prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
        p[name] = root / name
        pm.save_pretrained(p[name])
    # the adapters' deltas as peft computes them (the reference)
    deltas = {}
    for name in ("ad1", "ad2"):
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), p[name])
        deltas[name] = {k: torch.zeros_like(v) for k, v in base.items()}
        for k in base:
            mod = k[: -len(".weight")]
            sub = pm.base_model.model.get_submodule(mod) if PROJ.search(k) else None
            if sub is not None and hasattr(sub, "get_delta_weight"):
                deltas[name][k] = sub.get_delta_weight("default").detach()
    # a tunelab run directory, as `tunelab run` leaves it (recipe.yaml, export/adapter, export/merged)
    run = root / "runs" / "date"
    (run / "export").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "date", "model": {"name_or_path": str(tiny_model_dir)}}))
    shutil.copytree(p["ad1"], run / "export" / "adapter")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), p["ad1"]).merge_and_unload()
    merged.save_pretrained(run / "export" / "merged")
    p["run"] = run
    from tiny import build_tiny_model

    p["other_shape"] = root / "other_shape"
    build_tiny_model(base["model.embed_tokens.weight"].shape[0], intermediate_size=96).save_pretrained(p["other_shape"])
    sds = {k: load_file(str(p[k] / "model.safetensors")) for k in ("ft1", "ft2", "noisy", "mirror")}
    return {"paths": p, "base": base, "deltas": deltas, **sds}


def _merge(tmp_path, recipe, *extra, name="out"):
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    res = runner.invoke(app, ["merge", str(f), "-o", str(out), *extra])
    return res, out


def _load(out):
    """Load through transformers (the contract), return its state dict and check the logits are finite."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(m(torch.tensor([[1, 5, 9]])).logits).all()
    return {k: v.detach() for k, v in m.state_dict().items()}


def _m(paths, *names, **params):
    return [{"model": str(paths[n]), **({"parameters": params[n]} if n in params else {})} for n in names]


def test_help_documents_recipe_and_methods():
    res = runner.invoke(app, ["merge", "--help"], terminal_width=120)
    assert res.exit_code == 0
    for word in ("merge_method", "ties", "bitdelta", "lora_cat", "score_task", "export/merged", "--overwrite"):
        assert word in res.output, word


def test_linear_weighted_average(models, tmp_path):
    P = models["paths"]
    res, out = _merge(tmp_path, {"merge_method": "linear", "base_model": str(P["base"]),
                                 "models": _m(P, "ft1", "ft2", ft1={"weight": 1.0}, ft2={"weight": 3.0})})
    assert res.exit_code == 0, res.output
    assert "merged model written to" in res.output
    got = _load(out)
    for k, b in models["base"].items():
        torch.testing.assert_close(got[k], (models["ft1"][k] + 3 * models["ft2"][k]) / 4, rtol=0, atol=1e-6, msg=k)
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()  # still tied


def test_ties_with_peft_adapter_matches_peft(models, tmp_path):
    from peft.utils import merge_utils as pm

    P, base = models["paths"], models["base"]
    res, out = _merge(tmp_path, {"merge_method": "ties", "base_model": str(P["base"]),
                                 "models": _m(P, "ft1", "ad1", ft1={"weight": 0.6}, ad1={"weight": 1.4}),
                                 "parameters": {"density": 0.3}, "convention": "peft"})
    assert res.exit_code == 0, res.output
    got = _load(out)
    for k in base:
        deltas = [models["ft1"][k] - base[k], models["deltas"]["ad1"][k]]
        expected = base[k] + pm.ties(deltas, torch.tensor([0.6, 1.4]), 0.3, "total")
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6, msg=k)


def test_run_dir_inputs_and_lora_cat_adapter(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    P, base, d = models["paths"], models["base"], models["deltas"]
    # weight-space merge: the run stands for its export/merged
    res, out = _merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(P["base"]),
                                 "models": _m(P, "run"), "parameters": {"lambda": 0.5}}, name="ta")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "tunelab_merge.yaml").read_text())["models"][0]["model"].endswith("export/merged")
    got = _load(out)
    for k in base:
        torch.testing.assert_close(got[k], base[k] + 0.5 * d["ad1"][k], rtol=0, atol=1e-6, msg=k)
    # LoRA-level: the run stands for its export/adapter; output is a PEFT adapter of rank 4 + 4
    res, out = _merge(tmp_path, {"merge_method": "lora_cat", "base_model": str(P["base"]),
                                 "models": _m(P, "run", "ad2", ad2={"weight": -2.0})}, name="cat")
    assert res.exit_code == 0, res.output
    assert "LoRA adapter of rank 8" in res.output
    assert yaml.safe_load((out / "tunelab_merge.yaml").read_text())["models"][0]["model"].endswith("export/adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(P["base"]), out)
    merged = pm.merge_and_unload().state_dict()
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + d["ad1"][k] - 2.0 * d["ad2"][k], rtol=0, atol=1e-5, msg=k)
    # a plain checkpoint is not an adapter
    res, out = _merge(tmp_path, {"merge_method": "lora_linear", "models": _m(P, "ad1", "ft1")}, name="bad")
    assert res.exit_code == 2 and "is not one" in res.output and not out.exists()


def test_bitdelta_calibration_distils_the_scales(models, tmp_path):
    """`--calibration`: BitDelta's second stage. The compressed matrices stay base + alpha * sign(delta) with one
    alpha per matrix (now distilled), every other tensor stays the fine-tune's, and the model's logits on the
    calibration text are closer to the fine-tune's than the first stage's (mean |delta| scales)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    P, base, ft = models["paths"], models["base"], models["noisy"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"The {i}th day of the month came after day {i - 1} and before day {i + 1}."
                             for i in range(1, 80)))
    recipe = {"merge_method": "bitdelta", "base_model": str(P["base"]), "models": _m(P, "noisy")}
    res0, first = _merge(tmp_path, recipe, name="first")
    res, out = _merge(tmp_path, recipe, "--calibration", str(text), "--calibration-steps", "20",
                      "--calibration-lr", "1e-3", name="distilled")
    assert res0.exit_code == 0 and res.exit_code == 0, res.output
    assert "BitDelta scale distillation: 20 steps" in res.output
    report = json.loads((out / "tunelab_merge_report.json").read_text())
    assert report["distillation"]["matrices"] == 14 and "compression" in report
    got, first_sd = _load(out), _load(first)
    moved = 0
    for k, b in base.items():
        delta = ft[k] - b
        if PROJ.search(k):
            step = got[k] - b
            alpha = step.abs().mean()
            torch.testing.assert_close(step, alpha * torch.where(delta >= 0, 1.0, -1.0), rtol=0, atol=1e-6, msg=k)
            moved += abs(float(alpha) - float(delta.abs().mean())) > 1e-6
        else:
            torch.testing.assert_close(got[k], ft[k], rtol=0, atol=0, msg=k)
    assert moved > 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok(text.read_text(), add_special_tokens=False)["input_ids"][:128]])

    def logits(sd):
        m = AutoModelForCausalLM.from_pretrained(P["base"])
        m.load_state_dict(sd, strict=False)
        with torch.no_grad():
            return m(input_ids=ids).logits

    target = logits(ft)
    assert (logits(got) - target).pow(2).mean() < (logits(first_sd) - target).pow(2).mean()
    res, _ = _merge(tmp_path, {"merge_method": "ties", "base_model": str(P["base"]), "models": _m(P, "ft1", "ft2")},
                    "--calibration", str(text), name="notbd")
    assert res.exit_code == 2 and "--calibration distils BitDelta's scales" in res.output


def test_bitdelta_and_svd_delta_print_ratio(models, tmp_path):
    P, base, ft = models["paths"], models["base"], models["ft1"]
    res, out = _merge(tmp_path, {"merge_method": "bitdelta", "base_model": str(P["base"]), "models": _m(P, "ft1")},
                      name="bd")
    assert res.exit_code == 0, res.output
    got = _load(out)
    dense = stored = 0
    for k, b in base.items():
        delta = ft[k] - b
        dense += 4 * b.numel()
        if PROJ.search(k):  # the blocks' projections: mean|delta| * sign(delta), sign(0) = +1
            expected = b + delta.abs().mean() * torch.where(delta >= 0, 1.0, -1.0)
            stored += math.ceil(b.numel() / 8) + 4
        else:  # embeddings and norms kept exactly
            expected, stored = ft[k], stored + 4 * b.numel()
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6, msg=k)
    assert f"compression ratio {stored / dense:.6f}" in res.output, res.output
    assert "14 matrices compressed" in res.output  # 7 projections x 2 layers
    report = json.loads((out / "tunelab_merge_report.json").read_text())["compression"]
    assert report["stored_bytes"] == stored and report["dense_bytes"] == dense
    assert report["compressed_ratio"] == pytest.approx(1 / 32, rel=0.01)

    # SVD rank 3 of a LoRA adapter's delta (rank 4): best rank-3 approximation, untouched tensors exact
    res, out = _merge(tmp_path, {"merge_method": "svd_delta", "base_model": str(P["base"]), "models": _m(P, "ad1"),
                                 "parameters": {"rank": 3}}, name="svd")
    assert res.exit_code == 0, res.output
    got = _load(out)
    stored = 0
    for k, b in base.items():
        delta = models["deltas"]["ad1"][k]
        if delta.any():
            u, s, vh = torch.linalg.svd(delta)
            torch.testing.assert_close(got[k], b + (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-6, msg=k)
            stored += 4 * 3 * sum(b.shape)
        else:
            assert torch.equal(got[k], b), k
    assert f"compression ratio {stored / dense:.6f}" in res.output, res.output


def _heldout_loss(sd, base_dir, n=4):
    """Independent held-out loss: SFT token-mean loss on the date task's eval split, as `tunelab eval` does."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.pipeline import encode_spec
    from tunelab.model import load_tokenizer
    from tunelab.objectives.base import build_objective
    from tunelab.recipe import DataConfig, DatasetSpec, ModelConfig
    from tunelab.train.loop import evaluate_loss

    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    data, _ = encode_spec(tok, DatasetSpec(builtin="date_format", split="eval", n=n, seed=5), DataConfig())
    m = AutoModelForCausalLM.from_pretrained(base_dir)
    m.load_state_dict(sd, strict=False)
    return evaluate_loss(m, build_objective("sft", {}), data, batch_size=32, pad_id=tok.pad_token_id,
                         device=torch.device("cpu"), precision="bf16")


def test_wise_ft_sweep_and_greedy_soup_scored_on_heldout_loss(models, tmp_path):
    P, base = models["paths"], models["base"]
    score = {"score_task": "date_format", "score_n": 4, "score_metric": "loss", "score_seed": 5}
    alphas = [1.0, 0.5, 0.0]
    res, out = _merge(tmp_path, {"merge_method": "wise_ft", "base_model": str(P["base"]), "models": _m(P, "noisy"),
                                 "parameters": {"alphas": alphas, **score}}, name="wise")
    assert res.exit_code == 0, res.output
    cands = {a: {k: (1 - a) * base[k] + a * models["noisy"][k] for k in base} for a in alphas}
    losses = {a: _heldout_loss(sd, P["base"]) for a, sd in cands.items()}
    best = min(alphas, key=lambda a: losses[a])
    assert f"best alpha {best}" in res.output
    for a in alphas:
        assert f"alpha {a}: {-losses[a]:.4f}" in res.output
    got = _load(out)
    for k in base:
        torch.testing.assert_close(got[k], cands[best][k], rtol=0, atol=1e-6)

    # greedy soup by the same score, against a re-implementation of Recipe 1 (noisy and mirror are far
    # worse than the base, and their mean is the base: the second one is accepted)
    names = ["noisy", "mirror"]
    sds = [models[n] for n in names]
    res, out = _merge(tmp_path, {"merge_method": "greedy_soup", "base_model": str(P["base"]),
                                 "models": _m(P, *names), "parameters": score}, name="soup")
    assert res.exit_code == 0, res.output
    ind = [-_heldout_loss(sd, P["base"]) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -ind[i])
    soup, best_score = [order[0]], ind[order[0]]
    for i in order[1:]:
        trial = {k: sum(sds[j][k] for j in soup + [i]) / (len(soup) + 1) for k in base}
        s = -_heldout_loss(trial, P["base"])
        if s > best_score:
            soup, best_score = soup + [i], s
    assert f"greedy soup of ingredients {soup}" in res.output and len(soup) == 2, res.output
    got = _load(out)
    for k in base:
        torch.testing.assert_close(got[k], sum(sds[j][k] for j in soup) / len(soup), rtol=0, atol=1e-6)
        torch.testing.assert_close(got[k], base[k], rtol=0, atol=1e-6)
    # without a score the soup cannot be made, and says how to give one
    res, out = _merge(tmp_path, {"merge_method": "greedy_soup", "models": _m(P, "ft1", "ft2")}, name="noscore")
    assert res.exit_code == 2 and "score_task" in res.output and not out.exists()


def test_errors_name_the_problem_and_write_nothing(models, tmp_path):
    P = models["paths"]
    recipe = {"merge_method": "ties", "base_model": str(P["base"]), "models": _m(P, "ft1", "other_shape"),
              "parameters": {"density": 0.5}}
    res, out = _merge(tmp_path, recipe)
    assert res.exit_code == 2
    assert re.search(r"shape mismatch for tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'", res.output)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no output, no temp dir
    res, _ = _merge(tmp_path, {**recipe, "parameters": {"densty": 0.5}})
    assert res.exit_code == 2 and "merge recipe field 'parameters.densty': unknown field" in res.output
    res, _ = _merge(tmp_path, {"merge_method": "bitdelta", "base_model": str(P["base"]), "models": _m(P, "ft1", "ft2")})
    assert res.exit_code == 2 and "merge recipe: bitdelta compresses one fine-tune's delta" in res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not found" in res.output
    # an existing output is kept unless --overwrite
    ok = {"merge_method": "linear", "models": _m(P, "ft1")}
    assert _merge(tmp_path, ok)[0].exit_code == 0
    res, out = _merge(tmp_path, {**ok, "models": _m(P, "ft2")})
    assert res.exit_code == 2 and "exists" in res.output
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"],
                       models["ft1"]["model.norm.weight"])
    res, out = _merge(tmp_path, {**ok, "models": _m(P, "ft2")}, "--overwrite")
    assert res.exit_code == 0, res.output
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"],
                       models["ft2"]["model.norm.weight"])
    (tmp_path / "unexported").mkdir()
    (tmp_path / "unexported" / "recipe.yaml").write_text("name: unexported\n")
    res, _ = _merge(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "unexported")}]})
    assert res.exit_code == 2 and "tunelab export" in res.output


@pytest.mark.slow
def test_real_tunelab_run_directory(models, tiny_model_dir, tmp_path):
    """A run made by `tunelab train` (2 LoRA steps) is a merge input, as export/merged and export/adapter."""
    from tiny import tiny_recipe_dict
    from transformers import AutoModelForCausalLM

    P = models["paths"]
    rec = tmp_path / "train.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", name="r",
                                                   train={"max_steps": 2})))
    res = runner.invoke(app, ["train", str(rec)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "r"
    trained = load_file(str(run / "export" / "merged" / "model.safetensors"))
    res, out = _merge(tmp_path, {"merge_method": "linear", "models": _m({"r": run, **P}, "r", "ft1")}, name="lin")
    assert res.exit_code == 0, res.output
    got = _load(out)
    for k in models["base"]:
        torch.testing.assert_close(got[k], (trained[k] + models["ft1"][k]) / 2, rtol=0, atol=1e-6)
    res, out = _merge(tmp_path, {"merge_method": "lora_svd", "base_model": str(P["base"]),
                                 "models": _m({"r": run, **P}, "r", "ad1"), "parameters": {"rank": 2}}, name="svd")
    assert res.exit_code == 0 and "rank 2" in res.output, res.output
    from peft import PeftModel

    assert isinstance(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(P["base"]), out), PeftModel)


def test_task_scorer_exact_match_and_checks(models):
    """The exact-match score is tunelab's exact_match on the task's held-out items; bad inputs are named."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.pipeline import eval_items
    from tunelab.evaluate.tasks import exact_match
    from tunelab.merging.score import TaskScorer
    from tunelab.model import load_tokenizer
    from tunelab.recipe import DataConfig, DatasetSpec, ModelConfig

    P = models["paths"]
    scorer = TaskScorer(P["base"], ["date_format", "arithmetic"], n=2, max_new_tokens=4, seed=3)
    got = scorer(models["ft1"])
    tok = load_tokenizer(ModelConfig(name_or_path=str(P["base"])))
    m = AutoModelForCausalLM.from_pretrained(P["ft1"])
    ref = {t: exact_match(m, tok, eval_items(DatasetSpec(builtin=t, split="eval", n=2, seed=3), DataConfig()),
                          max_new_tokens=4, precision="bf16", progress=False)["exact_match"]
           for t in ("date_format", "arithmetic")}
    assert scorer.history == [{**ref, "score": sum(ref.values()) / 2}] and got == sum(ref.values()) / 2
    with pytest.raises(ValueError, match="missing"):
        scorer({k: v for k, v in models["ft1"].items() if "norm" not in k})
    with pytest.raises(KeyError, match="unknown built-in task 'dates'"):
        TaskScorer(P["base"], ["dates"])


def test_shipped_merge_recipes_validate():
    from importlib import resources

    from tunelab.merging import load_recipe

    shipped = sorted(p.name for p in resources.files("tunelab").joinpath("recipes").iterdir()
                     if p.name.startswith("merge_"))
    assert shipped == ["merge_bitdelta.yaml", "merge_lora_cat.yaml", "merge_soup.yaml", "merge_ties.yaml"]
    methods = {n: load_recipe(str(resources.files("tunelab") / "recipes" / n)).merge_method for n in shipped}
    assert methods == {"merge_bitdelta.yaml": "bitdelta", "merge_lora_cat.yaml": "lora_cat",
                       "merge_soup.yaml": "greedy_soup", "merge_ties.yaml": "ties"}
    res = runner.invoke(app, ["merge", "merge_nope", "-o", "x"])
    assert res.exit_code == 2 and "merge recipe not found: merge_nope" in res.output
