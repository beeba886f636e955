"""SSF: the re-parameterisation by hand, the count, and what the merged linear looks like."""

import pytest
import torch
from test_own_common import linear_shapes, logits, n_trainable, prepared, trainable_names

from tunelab.methods.ssf import SSFLinear, ssf_reparameterise


def test_reparameterisation_by_hand_on_a_2x3_matrix():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([1.0, -1.0])
    gamma, beta = torch.tensor([2.0, 0.5]), torch.tensor([10.0, 20.0])
    w2, b2 = ssf_reparameterise(w, b, gamma, beta)
    assert torch.equal(w2, torch.tensor([[2.0, 4.0, 6.0], [2.0, 2.5, 3.0]]))  # diag(gamma) W
    assert torch.equal(b2, torch.tensor([12.0, 19.5]))  # gamma * b + beta
    w3, b3 = ssf_reparameterise(w, None, gamma, beta)  # no bias: b' = beta
    assert torch.equal(w3, w2) and torch.equal(b3, beta)
    # the wrapper computes gamma * (W x + b) + beta, and its folded linear computes the same
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    ssf = SSFLinear(lin)
    with torch.no_grad():
        ssf.ssf_scale.copy_(gamma)
        ssf.ssf_shift.copy_(beta)
    x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    # row 1: W x + b = [-2+1, -2-1] = [-1, -3] -> [2*-1+10, 0.5*-3+20] = [8, 18.5]
    # row 2: W x + b = [5.5+1, 16+-1] = [6.5, 15] -> [23, 27.5]
    expected = torch.tensor([[8.0, 18.5], [23.0, 27.5]])
    assert torch.equal(ssf(x).detach(), expected)
    folded = ssf.fold()
    assert type(folded) is torch.nn.Linear and torch.equal(folded(x).detach(), expected)


def test_count_and_names():
    method, model = prepared("ssf", {"target_modules": ["q_proj", "down_proj"]})
    shapes = linear_shapes(model)
    layers = model.config.num_hidden_layers
    # gamma and beta, [out] each, per targeted linear
    assert n_trainable(model) == layers * 2 * (shapes["q_proj"][0] + shapes["down_proj"][0]) == 512
    assert {n.rsplit(".", 1)[-1] for n in trainable_names(model)} == {"ssf_scale", "ssf_shift"}
    groups = method.param_groups(model, 0.1)
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"])  # gamma is not decayed towards 0


def test_merged_linears_are_plain_with_folded_bias():
    method, model = prepared("ssf", {"target_modules": ["gate_proj"]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    layer = model.model.layers[0].mlp.gate_proj
    w_expected = layer.ssf_scale.detach()[:, None] * layer.base.weight
    ref = logits(model)
    merged = method.merged_model(model)
    gate = merged.model.layers[0].mlp.gate_proj
    assert type(gate) is torch.nn.Linear and torch.equal(gate.weight, w_expected)
    assert merged.config.mlp_bias is True and torch.equal(merged.model.layers[0].mlp.up_proj.bias, torch.zeros(128))
    torch.testing.assert_close(logits(merged), ref, rtol=0, atol=1e-5)


def test_architecture_without_a_bias_switch_is_refused_before_anything_changes():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunelab.methods.registry import ExportUnsupported, build_method

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    method = build_method("ssf", {"target_modules": ["q_proj", "o_proj"]})  # Qwen2: q has a bias, o cannot
    model = method.prepare(qwen)
    with pytest.raises(ExportUnsupported, match=r"model.layers.0.self_attn.o_proj.bias"):
        method.merged_model(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SSFLinear)  # nothing was folded
    ok = build_method("ssf", {"target_modules": ["q_proj"]})
    merged = ok.merged_model(ok.prepare(Qwen2ForCausalLM(qwen.config)))
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
