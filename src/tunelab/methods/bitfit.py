"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel & Goldberg 2021, https://arxiv.org/abs/2106.10199. Update rule: b <- AdamW(b, dL/db)
for every bias b; all weight matrices stay frozen.

Llama-family linears have no bias, so there would be nothing to train: BitFit here ADDS a zero-initialised
bias [out_features] to every targeted linear that lacks one (the model starts unchanged; a warning says how
many were added), and also trains every bias the model already has (`existing_biases`, e.g. Qwen2's q/k/v
biases, GPT-2's LayerNorm biases). Trainable count = sum of out_features of the targeted linears without a
bias + numel of the existing biases.

Defaults: the seven linears of attention and MLP (q,k,v,o,gate,up,down), as for LoRA, so BitFit adds a bias
to every projection that writes to the residual stream or the attention/MLP internals.
Export: the merged model is the model itself with the biases declared in the config (Llama:
`attention_bias` / `mlp_bias` = true; the untargeted linears of a group get zero biases so the checkpoint is
complete); architectures without such a switch raise ExportUnsupported. The adapter export writes just the
biases in tunelab's own format (PEFT cannot load it).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from tunelab.methods._modules import OwnAdapterMixin, sync_bias_config, target_linears
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register

log = logging.getLogger(__name__)


class BitFitOptions(MethodOptions):
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Linears (name suffixes, or 'all-linear') that get a trainable bias; a zero bias is added "
                    "where the linear has none.",
    )
    existing_biases: bool = Field(True, description="Also train every bias the model already has.")


@register("bitfit", paper="https://arxiv.org/abs/2106.10199")
class BitFit(OwnAdapterMixin, Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "biases of the targeted linears (added as zeros where missing)"
    Config = BitFitOptions

    def __init__(self, config=None):
        super().__init__(config)
        self.added: list[str] = []  # names of the linears that got a new zero bias

    def prepare(self, model):
        model.requires_grad_(False)
        if self.config.existing_biases:
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)
        self.added = []
        for name, lin in target_linears(model, self.config.target_modules, method=self.name):
            if lin.bias is None:
                # b [out_features], zero: the model's function is unchanged at step 0
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device))
                self.added.append(name)
            lin.bias.requires_grad_(True)
        if self.added:
            log.warning("bitfit: %d targeted linears had no bias; added zero-initialised biases to them (e.g. %s)",
                        len(self.added), self.added[0])
        return model

    def merged_model(self, model):
        sync_bias_config(model)  # Llama: attention_bias / mlp_bias -> true, so from_pretrained keeps them
        return model
