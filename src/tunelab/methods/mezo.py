"""MeZO: memory-efficient zeroth-order fine-tuning — two forward passes per step, no backward.

Malladi et al. 2023, https://arxiv.org/abs/2305.17333. Update rule (SPSA with in-place perturbations):
z ~ N(0, I) regenerated from a per-step seed, g = (L(W + eps z) - L(W - eps z)) / (2 eps),
W <- W - lr * (g z + weight_decay * W)   (decay on matrices only, as in the MeZO code).
E_z[g z] = grad L for small eps, and for a quadratic L the central difference is exact: g = grad L . z.

Memory is that of inference: the weights are perturbed in place (+eps z, -2 eps z, +eps z), z is never
stored whole (it is regenerated parameter by parameter from the seed, one tensor at a time), forwards run
under no_grad and no .grad or optimizer state is ever allocated (`build_optimizer` returns a stateless SGD
that only carries the parameter groups and the schedule's lr).

Defaults: eps 1e-3 (the paper's), `params: full` (every weight) or `lora` (only LoRA's A and B, through
PEFT: the paper's MeZO-LoRA variant; then the usual LoRA adapter and merge exports apply). The paper's
learning rates are ~1e-6 (full) and ~1e-4 (LoRA) with many thousands of steps; ZO needs far more steps
than backprop. The per-step seed is a function of (seed, step), so resume needs no extra state. Forwards
run in eval mode (no dropout: both losses must see the same function, as in the MeZO trainer) and with the
recipe's precision; the step's reported loss is (L+ + L-)/2 (= L(W) + O(eps^2)).
Restoring W by +eps z after -2 eps z is exact up to float rounding (as in the original implementation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from tunelab.core.precision import autocast_context
from tunelab.methods.lora import LoRAOptions, lora_peft_config, wrap_peft
from tunelab.methods.registry import Capabilities, Method, register
from tunelab.train.interfaces import StepResult
from tunelab.train.loop import global_counts


def step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 1) % (2**62)


@torch.no_grad()
def perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """W += scale * z for every W, z regenerated from `seed` one tensor at a time (same order, same z)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)  # same shape as W
        p.add_(z, alpha=scale)


def regenerate_z(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The z that `perturb(params, seed, .)` uses (for tests and analysis)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]


@torch.no_grad()
def spsa_projected_grad(loss_fn: Callable[[], Any], params: list[torch.Tensor], seed: int, eps: float):
    """(g, L+, L-): the central-difference directional derivative along z(seed); W is restored after.

    loss_fn() returns a float or a tuple whose first element is the loss (extras are passed through).
    """
    perturb(params, seed, eps)
    plus = loss_fn()
    perturb(params, seed, -2 * eps)
    minus = loss_fn()
    perturb(params, seed, eps)
    lp = plus[0] if isinstance(plus, tuple) else plus
    lm = minus[0] if isinstance(minus, tuple) else minus
    return (float(lp) - float(lm)) / (2 * eps), plus, minus


class MeZOOptions(LoRAOptions):
    params: Literal["full", "lora"] = Field("full", description="Perturb every weight, or LoRA's A and B only.")
    eps: float = Field(1e-3, gt=0, description="Perturbation scale.")
    seed: int = Field(0, description="Seed of the perturbation directions (step s uses seed and s only).")


@register("mezo", paper="https://arxiv.org/abs/2305.17333")
class MeZO(Method):
    trains = "every parameter (or LoRA's A, B), by zeroth-order SPSA: no backward"
    Config = MeZOOptions
    capabilities = Capabilities(custom_step=True)

    def __init__(self, config=None):
        super().__init__(config)
        # params: lora wraps the model in a PEFT LoRA: an adapter (reference = the base with it disabled)
        self.capabilities = replace(MeZO.capabilities, is_adapter=self.config.params == "lora")
        self.precision = "fp32"

    def prepare(self, model):
        if self.config.params == "lora":

            opts = {k: v for k, v in self.config.model_dump().items() if k in LoRAOptions.model_fields}
            return wrap_peft(model, lora_peft_config(LoRAOptions(**opts)))
        for p in model.parameters():
            p.requires_grad_(True)  # "trainable" for counting and param groups; no backward ever runs
        return model

    def build_optimizer(self, model, train_config):
        self.precision = train_config.precision
        groups = [g for g in self.param_groups(model, train_config.weight_decay) if g["params"]]
        return torch.optim.SGD(groups, lr=train_config.lr)  # stateless: carries groups and the schedule's lr

    def custom_step(self, *, model, batches, objective, optimizer, lr, step, ref, backend, **_) -> StepResult:
        global_units, global_tokens = global_counts(objective, batches, backend)
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def loss() -> tuple[float, float, dict[str, float]]:
            total, metrics = 0.0, {}
            for b in batches:
                with autocast_context(backend.device, self.precision):
                    out = objective.compute(model, b, ref)
                total += float(out.loss_sum)
                for k, v in out.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
            global_sum = backend.reduce_sum([total])[0]  # every process gets the same g
            return global_sum / max(global_units, 1.0), total, metrics

        was_training = model.training
        model.eval()
        try:
            g, plus, minus = spsa_projected_grad(loss, params, step_seed(self.config.seed, step), self.config.eps)
        finally:
            model.train(was_training)
        self.last_projected_grad = g
        self.update(optimizer, step_seed(self.config.seed, step), g, lr)
        metrics = {k: (plus[2].get(k, 0.0) + minus[2].get(k, 0.0)) / 2 for k in plus[2]}
        return StepResult(loss_sum=(plus[1] + minus[1]) / 2, metric_sums=metrics, global_units=global_units,
                          global_tokens=global_tokens)

    @torch.no_grad()
    def update(self, optimizer, seed: int, g: float, lr: float) -> None:
        """W <- W - lr * (g z + wd W), z regenerated group by group in the same order as the perturbation."""
        gen = torch.Generator(device=optimizer.param_groups[0]["params"][0].device).manual_seed(seed)
        for group in optimizer.param_groups:
            wd = group.get("weight_decay", 0.0)
            for p in group["params"]:
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(z, alpha=-lr * g)

    def merged_model(self, model):
        return model.merge_and_unload() if self.config.params == "lora" else model

    def save_adapter(self, model, directory: str) -> None:
        if self.config.params != "lora":
            return super().save_adapter(model, directory)
        model.save_pretrained(directory, safe_serialization=True)
