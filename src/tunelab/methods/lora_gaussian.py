"""LoRA with Gaussian initialisation of A, through HF PEFT (`init_lora_weights="gaussian"`).

Hu et al. 2021, https://arxiv.org/abs/2106.09685 (section 4.1: "random Gaussian initialization for A and
zero for B"). Update rule: W' = W0 + s B A with A ~ N(0, std 1/r) [r, in] and B = 0 [out, r], so the model
starts unchanged; PEFT's plain `lora` uses Kaiming-uniform A instead (the reference implementation's choice).

Defaults: those of `lora` (r=16, alpha=32 on every attention and MLP linear); only the init differs, so
runs of the two isolate the effect of the initial A. Merges and exports like LoRA.
"""

from __future__ import annotations

from tunelab.methods._peft_common import PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions
from tunelab.methods.registry import register


@register("lora_gaussian", paper="https://arxiv.org/abs/2106.09685")
class LoRAGaussian(PeftMethod):
    """LoRA with A ~ N(0, std 1/r), B = 0 (the paper's initialisation)."""
    trains = "LoRA A, B with Gaussian A"

    Config = LoRAOptions

    def peft_config(self):
        return lora_init_config(self.config, "gaussian")
