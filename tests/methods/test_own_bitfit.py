"""BitFit: which biases train (counted by hand), zero biases added where Llama has none, and the export."""

import logging

import pytest
import torch
from test_own_common import VOCAB, linear_shapes, logits, n_trainable, prepared, trainable_names
from transformers import Qwen2Config, Qwen2ForCausalLM

from tunelab.methods.registry import ExportUnsupported, build_method


def test_count_is_out_features_of_the_targeted_linears(caplog):
    with caplog.at_level(logging.WARNING):
        method, model = prepared("bitfit", {})
    layers = model.config.num_hidden_layers
    # Llama has no bias anywhere: one new zero bias [out] per targeted linear, nothing else trains
    assert n_trainable(model) == layers * sum(out for out, _ in linear_shapes(model).values()) == 1024
    assert len(method.added) == 7 * layers
    assert all(n.endswith(".bias") for n in trainable_names(model))
    assert "added zero-initialised biases" in caplog.text and "14 targeted linears" in caplog.text
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.bias, torch.zeros(64))


def test_existing_biases_train_too():
    # attention_bias=True: q,k,v,o already have biases; only up_proj is targeted and gets a new one
    method, model = prepared("bitfit", {"target_modules": ["up_proj"]}, attention_bias=True)
    shapes = linear_shapes(model)
    layers = model.config.num_hidden_layers
    existing = layers * sum(shapes[k][0] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert n_trainable(model) == existing + layers * shapes["up_proj"][0] == 2 * (192 + 128)
    assert method.added == [f"model.layers.{i}.mlp.up_proj" for i in range(layers)]
    _, only_new = prepared("bitfit", {"target_modules": ["up_proj"], "existing_biases": False}, attention_bias=True)
    assert n_trainable(only_new) == layers * shapes["up_proj"][0]


def test_merged_config_declares_the_added_biases(tmp_path):
    from transformers import AutoModelForCausalLM

    method, model = prepared("bitfit", {"target_modules": ["q_proj"]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ref = logits(model)
    merged = method.merged_model(model)
    # q_proj got a bias, so the whole attention group is declared; k,v,o get zero biases, the MLP stays bias-free
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False
    attn = merged.model.layers[1].self_attn
    assert torch.equal(attn.k_proj.bias, torch.zeros(32)) and torch.equal(attn.o_proj.bias, torch.zeros(64))
    assert merged.model.layers[1].mlp.up_proj.bias is None
    merged.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=1e-5)


def _tiny_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))


def test_architecture_without_a_bias_switch_refuses_merged_export():
    # Qwen2: q,k,v have biases (always), o and the MLP have none and no config switch for one
    method = build_method("bitfit", {})
    model = method.prepare(_tiny_qwen2())
    assert n_trainable(model) == 2 * (64 + 32 + 32) + 2 * (64 + 128 + 128 + 64)  # existing qkv + added o,gate,up,down
    with pytest.raises(ExportUnsupported, match="no config switch for the biases"):
        method.merged_model(model)
    # targeting only the linears that already have biases: nothing added, merged export fine
    method = build_method("bitfit", {"target_modules": ["q_proj", "k_proj", "v_proj"]})
    model = method.prepare(_tiny_qwen2())
    assert method.added == [] and n_trainable(model) == 2 * (64 + 32 + 32)
    assert method.merged_model(model) is model
