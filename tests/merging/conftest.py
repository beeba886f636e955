"""Tiny random Llama checkpoints and a PEFT LoRA adapter for the merging tests (built once per session)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from merge_helpers import _perturbed, _save_tokenizer, tiny_config  # noqa: F401 - used by the tests


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths: base, ft1, ft2 (base + small perturbations), adapter (LoRA on q/v with non-zero B),
    rslora (a rsLoRA adapter), other_shape (intermediate_size 48), other_arch (config names another class)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("merging_models")
    paths = {}
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    paths["base"] = root / "base"
    base.save_pretrained(paths["base"])
    _save_tokenizer(paths["base"])
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i, name in enumerate(["ft1", "ft2"]):
        m = LlamaForCausalLM(tiny_config())
        m.load_state_dict(_perturbed(base_sd, seed=100 + i))
        paths[name] = root / name
        m.save_pretrained(paths[name])

    for name, kwargs in [("adapter", {}), ("rslora", {"use_rslora": True, "r": 2, "lora_alpha": 6})]:
        model = LlamaForCausalLM.from_pretrained(paths["base"])
        cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kwargs})
        peft_model = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(7 if name == "adapter" else 8)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        paths[name] = root / name
        peft_model.save_pretrained(paths[name])

    torch.manual_seed(1)
    paths["other_shape"] = root / "other_shape"
    LlamaForCausalLM(tiny_config(intermediate_size=48)).save_pretrained(paths["other_shape"])

    paths["other_arch"] = root / "other_arch"
    shutil.copytree(paths["ft1"], paths["other_arch"])
    cfg_file = paths["other_arch"] / "config.json"
    data = json.loads(cfg_file.read_text())
    data["architectures"] = ["MistralForCausalLM"]
    cfg_file.write_text(json.dumps(data))
    return paths
