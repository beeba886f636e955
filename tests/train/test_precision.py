import pytest
import torch
from tiny import tiny_recipe_dict

from tunelab.recipe import Recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.precision import cast_frozen_linears, upcast_linears


def test_cast_only_frozen_untied_linears(tiny_model):
    from tunelab.methods.registry import build_method

    model = build_method("lora", {"r": 2, "alpha": 4}).prepare(tiny_model)
    n = cast_frozen_linears(model, torch.bfloat16)
    cfg = tiny_model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    per_layer = cfg.hidden_size * (2 * cfg.hidden_size + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    assert n == per_layer * cfg.num_hidden_layers  # every base projection, not lm_head (tied) nor embeddings
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for name, d in dtypes.items() if "lora_" in name or "norm" in name
               or "embed" in name)
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    upcast_linears(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_frozen_storage_gives_the_same_training_under_autocast(tiny_model_dir, tmp_path):
    losses = {}
    for frozen in ("float32", "auto"):
        d = tiny_recipe_dict(tiny_model_dir, tmp_path / frozen, train={"precision": "bf16", "max_steps": 3,
                                                                       "frozen_dtype": frozen, "lr": 1e-2,
                                                                       "frozen_cast": "linears"})
        ws = open_workspace(Recipe.model_validate(d))
        _, result, _ = train_workspace(ws)
        losses[frozen] = result.losses
    # the matmuls see the same bf16 weights either way: identical up to summation-order noise
    assert losses["auto"] == pytest.approx(losses["float32"], rel=1e-3)


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path):
    losses = {}
    for ckpt in (False, True):
        d = tiny_recipe_dict(tiny_model_dir, tmp_path / str(ckpt), train={"max_steps": 3, "lr": 1e-2,
                                                                         "gradient_checkpointing": ckpt})
        ws = open_workspace(Recipe.model_validate(d))
        model, result, _ = train_workspace(ws)
        losses[ckpt] = result.losses
        assert model.base_model.model.is_gradient_checkpointing == ckpt
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_merged_export_uses_the_original_fp32_base(tiny_model_dir, tmp_path):
    """Training stores frozen weights in bf16; the merged export must carry the ORIGINAL fp32 values."""
    import json

    from safetensors.torch import load_file

    from tunelab.runner import run_recipe

    d = tiny_recipe_dict(tiny_model_dir, tmp_path, train={"precision": "bf16", "max_steps": 1},
                         eval={"before": False, "after": False})
    d["method"] = {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"]}
    summary = run_recipe(Recipe.model_validate(d))
    merged = load_file(str(tmp_path / "tiny" / "export" / "merged" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"  # not adapted: must equal the base bit for bit
    assert merged[k].dtype == torch.float32 and torch.equal(merged[k], base[k])
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["steps"] == summary["steps"] == 1
