"""Post-hoc LiNeS on the final delta: after the last stage, scale each layer's change by its depth.

Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
https://arxiv.org/abs/2410.17146. With the fine-tuning residual tau = theta - theta_0 (all stages together),

  theta_0 + lambda(l) tau(l),   lambda(l) = alpha + beta * l / (L - 1),   beta = 1 - alpha by default
so shallow layers keep alpha of their change (general features preserved) and the deepest keeps all of it
(tunelab.merging.ops.lines_scale; every tensor outside the layers, embeddings, final norm and head, gets
alpha, as the authors' code). alpha defaults to 1 / (number of stages). Applied after the last stage, before
it is evaluated: the last row of the R matrix is the scaled model. For LoRA adapters tau = scale * B A is linear
in B, so each layer's lora_B is scaled (every task's adapter with O-LoRA); for methods that train the weights
themselves the base weights are loaded again to form tau. Other adapter kinds are refused.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyError, StrategyOptions, register_strategy, unwrap


def apply_lines(model: torch.nn.Module, base_state: dict[str, torch.Tensor] | None, num_layers: int, alpha: float,
                beta: float | None = None) -> int:
    """Scale the model's delta in place; returns the number of tensors changed. `base_state` (the base
    model's state dict, names as the model's) is needed unless the delta lives in lora_B matrices."""
    from tunelab.merging.ops import lines_scale

    n = 0
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if ".lora_B." in name:
                p.mul_(lines_scale(name, num_layers, alpha, beta))
                n += 1
            elif base_state is not None and name in base_state:
                w0 = base_state[name].to(p.device, torch.float32)
                lam = lines_scale(name, num_layers, alpha, beta)
                p.copy_((w0 + lam * (p.float() - w0)).to(p.dtype))
                n += 1
    return n


@register_strategy("lines", paper="https://arxiv.org/abs/2410.17146")
class LiNeS(Strategy):
    """Layer-increasing scaling of the final fine-tuning delta (shallow layers shrink most)."""

    class Config(StrategyOptions):
        alpha: float | None = Field(None, ge=0, le=1, description="Scale of the shallowest layer; default "
                                                                  "1 / number of stages.")
        beta: float | None = Field(None, description="Added scale at the deepest layer; default 1 - alpha.")

    def check(self, ctx):
        if ctx.method.capabilities.is_adapter and ctx.recipe.base.method.name != "lora":
            raise StrategyError(f"strategy lines scales LoRA deltas or full weights; method "
                                f"{ctx.recipe.base.method.name!r} is another kind of adapter")

    def after_stage(self, ctx, model, stage):
        if stage != ctx.n_stages - 1:
            return
        from tunelab.methods.freeze import num_layers

        alpha = self.config.alpha if self.config.alpha is not None else 1.0 / ctx.n_stages
        base_state = None
        if not ctx.method.capabilities.is_adapter:
            from tunelab.model import load_model

            base_state = load_model(ctx.recipe.base.model).state_dict()
        apply_lines(model, base_state, num_layers(unwrap(model)), alpha, self.config.beta)
