"""End to end: tiny random Llama "fine-tunes" and a PEFT LoRA adapter merged through run_merge."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as pm
from safetensors.torch import load_file

from tunelab.merging import ops
from tunelab.merging.run import run_merge, tensor_seed
from tunelab.weights import CheckpointReader

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:The density .* no pruning:UserWarning")


def _sd(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def refs(tiny_models):
    """Reference tensors: base/ft state dicts and the adapter delta as computed by peft itself."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = _sd(tiny_models["base"])
    pmodel = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_models["base"]), tiny_models["adapter"])
    adapter_delta = {k: torch.zeros_like(v) for k, v in base.items()}
    for name in base:
        if ".q_proj." in name or ".v_proj." in name:
            module = pmodel.base_model.model.get_submodule(name[: -len(".weight")])
            adapter_delta[name] = module.get_delta_weight("default").detach()
    merged_by_peft = pmodel.merge_and_unload().state_dict()
    return {"base": base, "ft1": _sd(tiny_models["ft1"]), "ft2": _sd(tiny_models["ft2"]), "delta": adapter_delta,
            "peft_merged": merged_by_peft}


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _models(tm, *names, **params):
    return [{"model": str(tm[n]), **({"parameters": params[n]} if n in params else {})} for n in names]


def test_linear_with_adapter_end_to_end(tiny_models, refs, tmp_path):
    recipe = {
        "merge_method": "linear",
        "base_model": str(tiny_models["base"]),
        "models": _models(tiny_models, "ft1", "ft2", "adapter",
                          ft1={"weight": 1.0}, ft2={"weight": 2.0}, adapter={"weight": 1.0}),
    }
    out = run_merge(recipe, tmp_path / "linear")
    got = _load(out)
    adapter_full = {k: refs["base"][k] + refs["delta"][k] for k in refs["base"]}
    for k in refs["base"]:
        # the adapter materialised by peft (merge_and_unload) is the same model
        torch.testing.assert_close(adapter_full[k], refs["peft_merged"][k], rtol=0, atol=1e-6)
        expected = (refs["ft1"][k] + 2 * refs["ft2"][k] + adapter_full[k]) / 4
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6, msg=k)
    assert (out / "tokenizer.json").is_file() and (out / "tunelab_merge.yaml").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("t5 t7")["input_ids"] == [5, 7]


def test_ties_with_adapter_matches_peft(tiny_models, refs, tmp_path):
    w = [0.7, 1.0, 1.3]
    recipe = {
        "merge_method": "ties",
        "base_model": str(tiny_models["base"]),
        "models": _models(tiny_models, "ft1", "ft2", "adapter",
                          ft1={"weight": w[0]}, ft2={"weight": w[1]}, adapter={"weight": w[2]}),
        "parameters": {"density": 0.4, "lambda": 1.0},
        "convention": "peft",
    }
    got = _load(run_merge(recipe, tmp_path / "ties"))
    base = refs["base"]
    for k in base:
        deltas = [refs["ft1"][k] - base[k], refs["ft2"][k] - base[k], refs["delta"][k]]
        expected = base[k] + pm.ties(deltas, torch.tensor(w), 0.4, "total")
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6, msg=k)


def test_streaming_methods(tiny_models, refs, tmp_path):
    tm, b, f1, f2, d = tiny_models, refs["base"], refs["ft1"], refs["ft2"], refs["delta"]
    base = str(tm["base"])
    cases = {
        "task_arithmetic": ({"models": _models(tm, "ft1", "adapter"), "parameters": {"lambda": 0.5}},
                            lambda k: b[k] + 0.5 * ((f1[k] - b[k]) + d[k])),
        "wise_ft": ({"models": _models(tm, "ft2"), "parameters": {"alpha": 0.3}}, lambda k: 0.7 * b[k] + 0.3 * f2[k]),
        "slerp": ({"models": _models(tm, "ft1"), "parameters": {"t": 0.4}}, lambda k: ops.slerp(0.4, b[k], f1[k])),
        "model_stock": ({"models": _models(tm, "ft1", "ft2")}, lambda k: ops.model_stock(b[k], [f1[k], f2[k]])),
        "lines": ({"models": _models(tm, "ft1"), "parameters": {"alpha": 0.2}},
                  lambda k: b[k] + ops.lines_scale(k, 2, 0.2) * (f1[k] - b[k])),
        # the adapter was trained on "base": carry its delta over to "ft2" as the new base
        "transfer": ({"base_model": str(tm["ft2"]), "models": _models(tm, "adapter"),
                      "parameters": {"source_base": base}},
                     lambda k: f2[k] + d[k]),
    }
    for method, (extra, expect) in cases.items():
        recipe = {"merge_method": method, "base_model": base, **extra}
        got = _load(run_merge(recipe, tmp_path / method))
        for k in b:
            torch.testing.assert_close(got[k], expect(k), rtol=0, atol=1e-5, msg=f"{method}: {k}")


def test_dare_ties_reproducible_and_matches_ops(tiny_models, refs, tmp_path):
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(tiny_models["base"]),
        "models": _models(tiny_models, "ft1", "ft2"),
        "parameters": {"density": 0.5, "seed": 3},
        "convention": "peft",
    }
    a = _sd(run_merge(recipe, tmp_path / "a"))
    b = _sd(run_merge(recipe, tmp_path / "b"))
    base = refs["base"]
    for k in base:
        assert torch.equal(a[k], b[k])
        g = torch.Generator().manual_seed(tensor_seed(3, k))
        torch.manual_seed(tensor_seed(3, k))  # peft draws from the global generator
        deltas = [refs["ft1"][k] - base[k], refs["ft2"][k] - base[k]]
        expected = base[k] + pm.dare_ties(deltas, torch.ones(2), 0.5)
        torch.testing.assert_close(a[k], base[k] + ops.dare_ties(deltas, 0.5, g), rtol=0, atol=0)
        torch.testing.assert_close(a[k], expected, rtol=0, atol=1e-6)


def test_greedy_soup_and_wise_ft_sweep_with_score_fn(tiny_models, refs, tmp_path):
    b, f1, f2 = refs["base"], refs["ft1"], refs["ft2"]
    # target base + p1 + p2: ft1, ft2 score ~|p|, base ~sqrt(2)|p| (worst); soup{ft_i} -> + ft_j gives
    # |p1 + p2| / 2 ~ 0.71|p| (kept) -> + base gives 2|p1 + p2| / 3 ~ 0.94|p| (rejected)
    target = {k: f1[k] + f2[k] - b[k] for k in b}

    def score(sd):
        return -sum(float((sd[k].float() - target[k]).pow(2).sum()) for k in target)

    recipe = {"merge_method": "greedy_soup", "base_model": str(tiny_models["base"]),
              "models": _models(tiny_models, "ft1", "ft2", "base")}
    got = _load(run_merge(recipe, tmp_path / "soup", score_fn=score))
    for k in target:
        torch.testing.assert_close(got[k], (f1[k] + f2[k]) / 2, rtol=0, atol=1e-6)  # base rejected
    sweep = {"merge_method": "wise_ft", "base_model": str(tiny_models["base"]), "models": _models(tiny_models, "ft1"),
             "parameters": {"alphas": [0.0, 0.5, 1.0]}}
    got = _load(run_merge(sweep, tmp_path / "sweep", score_fn=lambda sd: -abs(
        float(sd["model.norm.weight"].mean()) - float(refs["ft1"]["model.norm.weight"].mean()))))
    torch.testing.assert_close(got["model.norm.weight"], refs["ft1"]["model.norm.weight"])
    with pytest.raises(ValueError, match="score_fn"):
        run_merge(recipe, tmp_path / "no_score")


def test_sharded_output_dtype_and_reader(tiny_models, refs, tmp_path):
    recipe = {"merge_method": "linear", "models": _models(tiny_models, "ft1", "ft2"), "dtype": "bfloat16"}
    out = run_merge(recipe, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 2
    got = _load(out)
    with CheckpointReader(out) as rd:
        assert rd.config["dtype"] == "bfloat16" and set(rd.names()) == set(refs["base"])
        for k in refs["base"]:
            expected = ((refs["ft1"][k] + refs["ft2"][k]) / 2).to(torch.bfloat16)
            assert rd.dtype(k) == torch.bfloat16 and torch.equal(rd.get(k), expected)
            torch.testing.assert_close(got[k].to(torch.bfloat16), expected, rtol=0, atol=0)
    # the sharded checkpoint is itself a valid input
    again = run_merge({"merge_method": "linear", "models": _models({"s": out}, "s")}, tmp_path / "again")
    assert torch.equal(_sd(again)["lm_head.weight"], CheckpointReader(out).get("lm_head.weight"))


@pytest.mark.parametrize(
    "bad, match",
    [("other_shape", r"shape mismatch for tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'"),
     ("other_arch", "architecture mismatch")],
)
def test_mismatch_writes_nothing(tiny_models, tmp_path, bad, match):
    out = tmp_path / "out"
    recipe = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
              "models": _models(tiny_models, "ft1", bad), "parameters": {"density": 0.5}}
    with pytest.raises(ValueError, match=match):
        run_merge(recipe, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_nothing_and_existing_output_kept(tiny_models, tmp_path, monkeypatch):
    from tunelab.merging import run as run_mod

    out = tmp_path / "out"
    recipe = {"merge_method": "linear", "models": _models(tiny_models, "ft1", "ft2")}

    def boom(self, name):
        if "layers.1" in name:
            raise RuntimeError("disk on fire")
        return orig(self, name)

    orig = run_mod._Run.merge_tensor
    monkeypatch.setattr(run_mod._Run, "merge_tensor", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_merge(recipe, out, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(run_mod._Run, "merge_tensor", orig)
    run_merge(recipe, out)
    with pytest.raises(FileExistsError):
        run_merge(recipe, out)
    before = _sd(out)
    run_merge({**recipe, "models": _models(tiny_models, "ft1")}, out, overwrite=True)
    assert not torch.equal(_sd(out)["lm_head.weight"], before["lm_head.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
