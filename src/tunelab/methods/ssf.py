"""SSF: Scale and Shift the deep Features after each targeted linear.

Lian et al. 2022, https://arxiv.org/abs/2210.08823. Update rule: y = gamma * (W x + b) + beta with per-channel
gamma, beta [out_features]; only gamma and beta train. Re-parameterisation on export:
W' = diag(gamma) W, b' = gamma * b + beta (b' = beta where the linear had no bias).

Defaults: gamma = 1 and beta = 0 so the model starts exactly unchanged (the paper draws gamma ~ N(1, 0.02),
beta ~ N(0, 0.02); exact identity makes "step 0 = base model" testable and costs nothing); the seven linears
of attention and MLP (q,k,v,o,gate,up,down), as for LoRA. The paper also scales/shifts after norms and
activations; here only linears, so everything folds into the weights. gamma and beta are 1-d, so they get no
weight decay (which would pull gamma towards 0, not towards the identity).
Export: merged = plain linears with W' and b' (Llama configs get attention_bias / mlp_bias = true; see
`_modules.sync_bias_config`); adapter = gamma and beta in tunelab's own format (PEFT cannot load it).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.methods._modules import FoldableWrapper, OwnAdapterMixin, fold_wrappers, target_linears, wrap_targets
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register


class SSFLinear(FoldableWrapper):
    """y = gamma * base(x) + beta."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__(base)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.ssf_scale = torch.nn.Parameter(torch.ones(base.out_features, **kw))  # gamma [out]
        self.ssf_shift = torch.nn.Parameter(torch.zeros(base.out_features, **kw))  # beta [out]

    fold_has_bias = True  # b' = gamma * b + beta, even where the linear had no bias

    def forward(self, x):
        y = self.base(x)  # [..., out]
        return y * self.ssf_scale.to(y.dtype) + self.ssf_shift.to(y.dtype)

    @torch.no_grad()
    def fold(self) -> torch.nn.Linear:
        w, b = ssf_reparameterise(self.base.weight, self.base.bias, self.ssf_scale, self.ssf_shift)
        out = torch.nn.Linear(self.base.in_features, self.base.out_features, bias=True, dtype=w.dtype,
                              device=w.device)
        out.weight.copy_(w)
        out.bias.copy_(b)
        out.requires_grad_(False)
        return out


def ssf_reparameterise(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor,
                       beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in], b [out] | None, gamma [out], beta [out] -> (diag(gamma) W, gamma * b + beta)."""
    w = gamma[:, None] * weight
    b = beta if bias is None else gamma * bias + beta
    return w, b.clone()


class SSFOptions(MethodOptions):
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Linears (name suffixes, or 'all-linear') followed by a per-channel scale and shift.",
    )


@register("ssf", paper="https://arxiv.org/abs/2210.08823")
class SSF(OwnAdapterMixin, Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "per-channel scale and shift after each targeted linear"
    Config = SSFOptions

    def prepare(self, model):
        model.requires_grad_(False)
        wrap_targets(model, target_linears(model, self.config.target_modules, method=self.name), SSFLinear)
        return model

    def merged_model(self, model):
        return fold_wrappers(model)
