"""Asymmetric LoRA: A frozen at its random initialisation, only B trains.

Zhu et al. 2024, "Asymmetry in Low-Rank Adapters of Foundation Models", https://arxiv.org/abs/2402.16842.
Update rule: W' = W0 + (alpha / r) * B @ A with A [r, in] fixed random, B [out, r] (zero init) trained; half
of LoRA's parameters (r * out per linear) and, per the paper, a tighter generalisation bound at about the same
accuracy: A only picks a random r-dimensional view of the input, B learns what to write.

Defaults: LoRA's (r=16, alpha=32, all seven linears) and `a_init: orthogonal` (A with orthonormal rows: the
random orthogonal A the paper analyses and recommends); "kaiming" keeps PEFT's standard LoRA init of A.
Built on PEFT's LoRA, so the PEFT-format adapter export works (A is saved with B) and merging is PEFT's.
Checkpoints carry A as well (it is frozen, but it is random: without it a resume would depend on the RNG).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.methods.lora import LoRAOptions, PeftAdapterMethod, lora_peft_config
from tunelab.methods.registry import Capabilities, register


class AsymmetricLoRAOptions(LoRAOptions):
    a_init: Literal["orthogonal", "kaiming"] = Field(
        "orthogonal", description="Random A: orthonormal rows, or PEFT's Kaiming-uniform.")


def lora_layers(model):
    """(name, PEFT LoraLayer) with a 'default' adapter."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


@register("asymmetric_lora", paper="https://arxiv.org/abs/2402.16842")
class AsymmetricLoRA(PeftAdapterMethod):
    capabilities = Capabilities(is_adapter=True, supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "LoRA B only (A frozen at its random init)"
    Config = AsymmetricLoRAOptions

    def peft_config(self):
        opts = self.config.model_dump(exclude={"a_init"})
        return lora_peft_config(LoRAOptions(**opts))

    def prepare(self, model):
        model = super().prepare(model)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                a = layer.lora_A["default"].weight  # [r, in]
                if self.config.a_init == "orthogonal":
                    torch.nn.init.orthogonal_(a)  # rows orthonormal (r <= in)
                a.requires_grad_(False)
        return model

    def trainable_state_dict(self, model):
        state = super().trainable_state_dict(model)
        state.update({n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n})
        return state
