"""Asymmetric LoRA: only B trains (counted), A stays at its random orthogonal init, and A travels with checkpoints
and the PEFT adapter."""

import torch
from test_own_common import linear_shapes, logits, n_trainable, prepared, train, trainable_names

from tunelab.methods.asymmetric_lora import lora_layers


def test_only_B_trains_and_A_is_orthonormal_and_frozen():
    r = 4
    method, model = prepared("asymmetric_lora", {"r": r, "alpha": 8})
    layers = model.config.num_hidden_layers
    assert n_trainable(model) == layers * r * sum(out for out, _ in linear_shapes(model).values()) == 4096
    assert trainable_names(model) and all(".lora_B." in n for n in trainable_names(model))
    a0 = {n: layer.lora_A["default"].weight.detach().clone() for n, layer in lora_layers(model)}
    for a in a0.values():
        torch.testing.assert_close(a @ a.T, torch.eye(r), rtol=0, atol=1e-5)  # orthonormal rows
    with torch.no_grad():  # B non-zero, so A would receive a gradient if it were trainable
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.02)
    train(method, model, steps=2)
    for n, layer in lora_layers(model):
        assert torch.equal(layer.lora_A["default"].weight, a0[n]) and layer.lora_A["default"].weight.grad is None


def test_kaiming_option_keeps_peft_init():
    _, model = prepared("asymmetric_lora", {"r": 4, "alpha": 8, "a_init": "kaiming"})
    a = lora_layers(model)[0][1].lora_A["default"].weight  # [4, 64], U(-1/8, 1/8): row norm^2 ~ 64/192
    assert (a.abs() <= 1 / 8).all() and not torch.allclose(a @ a.T, torch.eye(4), atol=0.1)


def test_checkpoint_carries_the_frozen_A():
    method, model = prepared("asymmetric_lora")
    train(method, model, steps=2)
    state = method.trainable_state_dict(model)
    assert sum(".lora_A." in k for k in state) == 14 and sum(".lora_B." in k for k in state) == 14
    method2, model2 = prepared("asymmetric_lora")
    with torch.no_grad():  # another random A (e.g. a resume under another RNG state): the checkpoint restores it
        for _, layer in lora_layers(model2):
            torch.nn.init.orthogonal_(layer.lora_A["default"].weight, generator=torch.Generator().manual_seed(7))
    method2.load_trainable_state_dict(model2, state)
    assert torch.equal(logits(model2), logits(model))


def test_peft_adapter_contains_A(tmp_path):
    from safetensors.torch import load_file

    method, model = prepared("asymmetric_lora")
    method.save_adapter(model, str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert sum(".lora_A." in k for k in keys) == 14 and sum(".lora_B." in k for k in keys) == 14
