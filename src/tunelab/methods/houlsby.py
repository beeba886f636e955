"""Houlsby (bottleneck) adapters: a small residual MLP after the attention and/or MLP sublayer.

Houlsby et al. 2019, https://arxiv.org/abs/1902.00751. Update rule: h <- h + W_up f(W_down h + b_down) + b_up
on the sublayer's output h [..., d] (before the residual add, as in the paper), W_down [m, d], W_up [d, m];
only the adapters train.

Placement: "attn" wraps the attention output projection (`attn_module`, o_proj) and "mlp" the MLP output
projection (`mlp_module`, down_proj), so the adapter sees exactly the sublayer output. Both = Houlsby; ["mlp"]
alone = the Pfeiffer placement. Defaults: bottleneck m = 32 (the paper sweeps 8..256; 32 keeps the count near
LoRA r=16 on a 576-wide model), SiLU (the `adapters` library's Houlsby default is swish), W_down with nn.Linear's
default init and W_up = 0, b_up = 0, so the model starts exactly unchanged. Per adapter: 2 d m + m + d
parameters. The paper also trains the layer norms; here they stay frozen (Llama's RMSNorm has no bias).

Not mergeable (a nonlinearity sits between W_down and W_up): the merged export raises ExportUnsupported. The
adapter export writes tunelab's own safetensors format, which PEFT cannot load (PEFT has no bottleneck adapters);
`tunelab.methods._modules.load_own_adapter` re-applies it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.methods._modules import FoldableWrapper, OwnAdapterMixin, target_linears, wrap_targets
from tunelab.methods.registry import Capabilities, ExportUnsupported, Method, MethodOptions, register

ACTIVATIONS = {"silu": torch.nn.SiLU, "gelu": torch.nn.GELU, "relu": torch.nn.ReLU}


class BottleneckAdapter(FoldableWrapper):
    """y = h + up(act(down(h))) with h = base(x)."""

    def __init__(self, base: torch.nn.Linear, bottleneck: int, activation: str):
        super().__init__(base)
        d = base.out_features
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.adapter_down = torch.nn.Linear(d, bottleneck, **kw)  # [m, d] + [m]
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = torch.nn.Linear(bottleneck, d, **kw)  # [d, m] + [d]
        torch.nn.init.zeros_(self.adapter_up.weight)
        torch.nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x):
        h = self.base(x)  # [..., d]
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))

    def fold(self):
        raise ExportUnsupported(NOT_MERGEABLE)


NOT_MERGEABLE = ("houlsby: a bottleneck adapter is a nonlinear module (h + up(act(down(h)))), it cannot be folded "
                 "into the weights, so there is no merged model; use the adapter export (tunelab's own safetensors "
                 "format: PEFT cannot load it; re-apply with tunelab.methods._modules.load_own_adapter)")


class HoulsbyOptions(MethodOptions):
    bottleneck: int = Field(32, ge=1, description="Bottleneck width m.")
    placement: list[Literal["attn", "mlp"]] = Field(
        default_factory=lambda: ["attn", "mlp"], min_length=1,
        description="Where adapters go: after the attention sublayer and/or after the MLP.")
    activation: Literal["silu", "gelu", "relu"] = Field("silu", description="Nonlinearity between down and up.")
    attn_module: str = Field("o_proj", description="Name of the attention output projection.")
    mlp_module: str = Field("down_proj", description="Name of the MLP output projection.")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt (negative = from the top); "
                                                       "None = all.")


@register("houlsby", paper="https://arxiv.org/abs/1902.00751")
class Houlsby(OwnAdapterMixin, Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "bottleneck adapters after the attention and MLP outputs"
    mergeable = False
    Config = HoulsbyOptions

    def prepare(self, model):
        c = self.config
        model.requires_grad_(False)
        names = [{"attn": c.attn_module, "mlp": c.mlp_module}[p] for p in dict.fromkeys(c.placement)]
        targets = target_linears(model, names, c.layers, method=self.name)
        wrap_targets(model, targets, lambda lin: BottleneckAdapter(lin, c.bottleneck, c.activation))
        return model

    def merged_model(self, model):
        raise ExportUnsupported(NOT_MERGEABLE)
