"""LoRA-level merging: hand values, peft's add_weighted_adapter, adapter reading, adapter dirs."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.merging import lora as L
from tunelab.weights import AdapterReader, lora_scaling

T = torch.tensor
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_lora_delta_and_scaling_hand():
    A, B = T([[1.0, 2.0]]), T([[1.0], [3.0]])
    torch.testing.assert_close(L.lora_delta(A, B, 2.0), T([[2.0, 4.0], [6.0, 12.0]]))
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0


def test_linear_on_factors_is_not_delta_merging():
    A1, B1 = T([[1.0, 0.0]]), T([[1.0], [0.0]])
    A2, B2 = T([[0.0, 1.0]]), T([[0.0], [1.0]])
    A, B = L.lora_linear([A1, A2], [B1, B2])
    torch.testing.assert_close(A, T([[1.0, 1.0]]))
    torch.testing.assert_close(B, T([[1.0], [1.0]]))
    torch.testing.assert_close(B @ A, T([[1.0, 1.0], [1.0, 1.0]]))  # cross terms B1 A2, B2 A1
    exact = L.lora_delta(A1, B1) + L.lora_delta(A2, B2)
    torch.testing.assert_close(exact, T([[1.0, 0.0], [0.0, 1.0]]))
    Ac, Bc = L.lora_cat([A1, A2], [B1, B2])
    torch.testing.assert_close(Bc @ Ac, exact)  # concatenation is exact
    As, Bs = L.lora_svd([A1, A2], [B1, B2], rank=2)
    torch.testing.assert_close(Bs @ As, exact, rtol=0, atol=1e-6)
    # negative weight: sign goes on A only
    A, B = L.lora_linear([A1], [B1], weights=[-4.0])
    torch.testing.assert_close(B @ A, -4.0 * L.lora_delta(A1, B1))


def test_cat_and_svd_random():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 10, generator=g) for r in (2, 3)]
    Bs = [torch.randn(12, r, generator=g) for r in (2, 3)]
    w, s = [0.5, -1.5], [2.0, 0.25]
    exact = sum(wi * si * L.lora_delta(a, b) for wi, si, a, b in zip(w, s, As, Bs))
    A, B = L.lora_cat(As, Bs, w, s)
    assert A.shape == (5, 10) and B.shape == (12, 5)
    torch.testing.assert_close(B @ A, exact, rtol=0, atol=1e-5)
    A, B = L.lora_svd(As, Bs, rank=5, weights=w, scalings=s)
    torch.testing.assert_close(B @ A, exact, rtol=0, atol=1e-5)
    A, B = L.lora_svd(As, Bs, rank=2, weights=w, scalings=s)
    u, sv, vh = torch.linalg.svd(exact)
    torch.testing.assert_close(B @ A, (u[:, :2] * sv[:2]) @ vh[:2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="equal ranks"):
        L.lora_linear(As, Bs)


def _two_adapter_model(tiny_models):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_models["base"])
    pm = PeftModel.from_pretrained(model, tiny_models["adapter"], adapter_name="a")
    pm.load_adapter(tiny_models["rslora"], adapter_name="b")
    return pm


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_matches_peft_add_weighted_adapter(tiny_models, combination):
    pm = _two_adapter_model(tiny_models)
    layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    w = [0.6, 1.4]
    names = ["a", "b"]
    if combination == "linear":  # peft's linear needs equal ranks: merge "a" with itself
        names = ["a", "a2"]
        pm.load_adapter(tiny_models["adapter"], adapter_name="a2")
    pm.add_weighted_adapter(names, w, "m", combination_type=combination, svd_rank=3)
    As = [layer.lora_A[n].weight.detach() for n in names]
    Bs = [layer.lora_B[n].weight.detach() for n in names]
    ss = [layer.scaling[n] for n in names]
    ref_A, ref_B = layer.lora_A["m"].weight.detach(), layer.lora_B["m"].weight.detach()
    assert layer.scaling["m"] == 1.0
    if combination == "linear":
        A, B = L.lora_linear(As, Bs, w, ss)
        torch.testing.assert_close((A, B), (ref_A, ref_B), rtol=0, atol=1e-6)
    elif combination == "cat":
        A, B = L.lora_cat(As, Bs, w, ss)
        torch.testing.assert_close((A, B), (ref_A, ref_B), rtol=0, atol=1e-6)
    else:  # factors are unique only up to signs: compare the products
        A, B = L.lora_svd(As, Bs, 3, w, ss)
        torch.testing.assert_close(B @ A, ref_B @ ref_A, rtol=0, atol=1e-5)


def test_adapter_reader_matches_peft_delta(tiny_models):
    pm = _two_adapter_model(tiny_models)
    for adapter_name, key in [("a", "adapter"), ("b", "rslora")]:
        reader = AdapterReader(tiny_models[key])
        assert sorted(reader.names()) == sorted(
            f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
        )
        for name in reader.names():
            module = pm.base_model.model.get_submodule(name[: -len(".weight")])
            ref = module.get_delta_weight(adapter_name)
            assert reader.delta_shape(name) == tuple(ref.shape)
            assert reader.modules[name].scaling == module.scaling[adapter_name]
            torch.testing.assert_close(reader.delta(name), ref, rtol=0, atol=0)
    assert (AdapterReader(tiny_models["rslora"]).modules["model.layers.0.self_attn.q_proj.weight"].scaling
            == pytest.approx(6 / 2**0.5))


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_merge_lora_adapter_dirs(tiny_models, tmp_path, method):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = L.merge_lora_adapters([tiny_models["adapter"], tiny_models["rslora"]], tmp_path / "m", method, [0.5, 2.0],
                                rank=6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and cfg["use_rslora"] is False
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_models["base"]), out).merge_and_unload()
    base = LlamaForCausalLM.from_pretrained(tiny_models["base"]).state_dict()
    ra, rb = AdapterReader(tiny_models["adapter"]), AdapterReader(tiny_models["rslora"])
    for name, t in merged.state_dict().items():
        expected = base[name]
        if name in ra.modules:
            expected = expected + 0.5 * ra.delta(name) + 2.0 * rb.delta(name)
        # svd at rank 6 >= 4 + 2 is exact up to float error
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(FileExistsError):
        L.merge_lora_adapters([tiny_models["adapter"]], out, method)


def test_adapter_with_modules_to_save(tiny_models, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    pm = get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_models["base"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.1)
    pm.save_pretrained(tmp_path / "ad")
    reader = AdapterReader(tmp_path / "ad")
    assert "lm_head.weight" in reader.names()  # stored whole as base_model.model.lm_head.weight
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_models["base"]), tmp_path / "ad")
    merged = merged.merge_and_unload().state_dict()
    base = LlamaForCausalLM.from_pretrained(tiny_models["base"]).state_dict()
    for name in reader.names():
        torch.testing.assert_close(base[name] + reader.delta(name, base[name]), merged[name], rtol=0, atol=1e-6)
