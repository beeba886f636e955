"""Prefix tuning: learned key/value prefixes at every layer, through HF PEFT (`PrefixTuningConfig`).

Li & Liang 2021, https://arxiv.org/abs/2101.00190. Update rule: every attention layer l attends to
[K_l^p ; K_l] and [V_l^p ; V_l], with the prefixes P [n, layers * 2 * kv_dim] trainable (optionally through
an MLP reparametrisation P = MLP(P') during training) and the model frozen.

Defaults: n=20 virtual tokens; no reparametrisation (PEFT's default: the prefix is trained directly,
n * layers * 2 * kv_dim parameters; the paper's MLP, `prefix_projection: true`, steadies training on
some tasks at the cost of encoder_hidden_size * (hidden + layers * 2 * kv_dim) more). Input length is
unchanged (prefixes live in the KV cache), so logits need no trimming. Cannot merge (`ExportUnsupported`).
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PromptLearningMethod
from tunelab.methods.registry import MethodOptions, register


class PrefixTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Length n of the prefix.")
    prefix_projection: bool = Field(False, description="Train the prefix through an MLP (the paper's).")
    encoder_hidden_size: int = Field(512, ge=1, description="Hidden size of that MLP.")


@register("prefix_tuning", paper="https://arxiv.org/abs/2101.00190")
class PrefixTuning(PromptLearningMethod):
    """Learned key/value prefixes [n] at every attention layer."""
    trains = "key/value prefixes at every attention layer"

    Config = PrefixTuningOptions
    prepends_tokens = False

    def peft_config(self):
        from peft import PrefixTuningConfig

        c = self.config
        return PrefixTuningConfig(num_virtual_tokens=c.num_virtual_tokens, prefix_projection=c.prefix_projection,
                                  encoder_hidden_size=c.encoder_hidden_size, task_type="CAUSAL_LM")
