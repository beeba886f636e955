"""P-tuning: soft prompt produced by a trainable prompt encoder, through HF PEFT (`PromptEncoderConfig`).

Liu et al. 2021 ("GPT Understands, Too"), https://arxiv.org/abs/2103.10385. Update rule: input embeddings
[B, T, h] -> [f(P) ; E(x)] with P [n, h] and the encoder f (an MLP h -> e -> e -> h, or an LSTM) trained;
the model is frozen. The reparametrisation couples the virtual tokens, which the paper found stabler than
training P directly.

Defaults: n=20 virtual tokens, the MLP encoder with e = hidden size (PEFT's defaults; the LSTM variant is
`encoder: lstm`). The adapter stores f(P) itself (PEFT saves the encoder's output), so the loaded prompt is
exactly the trained one. Virtual positions are dropped from the logits. Cannot merge (`ExportUnsupported`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods._peft_common import PromptLearningMethod
from tunelab.methods.registry import MethodOptions, register


class PTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Length n of the soft prompt.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder reparametrisation.")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Encoder width e (null: the model's hidden size).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")


@register("p_tuning", paper="https://arxiv.org/abs/2103.10385")
class PTuning(PromptLearningMethod):
    """A soft prompt produced by a trainable MLP/LSTM prompt encoder."""
    trains = "a prompt encoder (MLP/LSTM) producing a soft prompt"

    Config = PTuningOptions

    def peft_config(self):
        from peft import PromptEncoderConfig

        c = self.config
        kwargs = {} if c.encoder_hidden_size is None else {"encoder_hidden_size": c.encoder_hidden_size}
        return PromptEncoderConfig(num_virtual_tokens=c.num_virtual_tokens,
                                   encoder_reparameterization_type=c.encoder.upper(),
                                   encoder_dropout=c.encoder_dropout, task_type="CAUSAL_LM", **kwargs)
