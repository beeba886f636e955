"""LN tuning: train only the normalisation layers, through HF PEFT (`LNTuningConfig`).

Zhao et al. 2023, https://arxiv.org/abs/2312.11420. Update rule: gamma <- AdamW(gamma, dL/dgamma) for the
scale (and bias, where the norm has one) of every selected norm layer; every other weight stays fixed.
PEFT trains a copy of each norm and keeps the original, so the adapter is just the norms.

Defaults: every RMSNorm of a Llama-family decoder (input_layernorm, post_attention_layernorm and the
final norm), the paper's "all LayerNorms" setting; (2 layers + 1) * hidden parameters. Merges exactly
(the trained norm replaces the original).
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.registry import MethodOptions, register


class LNTuningOptions(MethodOptions):
    target_modules: list[str] = Field(
        default_factory=lambda: ["input_layernorm", "post_attention_layernorm", "norm"],
        description="Norm modules (name suffixes) to train.")


@register("ln_tuning", paper="https://arxiv.org/abs/2312.11420")
class LNTuning(PeftMethod):
    """Only the normalisation layers train."""
    trains = "the normalisation layers"

    Config = LNTuningOptions

    def peft_config(self):
        from peft import LNTuningConfig

        return LNTuningConfig(target_modules=self.config.target_modules, task_type="CAUSAL_LM")
