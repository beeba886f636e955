"""GMT: gradient-mask tuning. Full fine-tuning in which each step updates only the entries of every tensor whose
accumulated gradient is large; the smallest ones are masked.

Li et al. 2024, "Gradient-Mask Tuning Elevates the Upper Limits of LLM Performance" (v2: "Enhancing Large
Language Model Performance with Gradient-Based Parameter Selection"), https://arxiv.org/abs/2406.15330.
Update rule: the step's gradient accumulated over its N micro-batches, Gamma = (1/N) sum_n grad L(Theta, B_n) (the
loop's accumulated gradient), is masked entry-wise per tensor, M(Gamma)_ij = Gamma_ij if |Gamma_ij| is above the
`mask_ratio` quantile of |Gamma| over that tensor, else 0; then theta <- AdamW(theta, M(Gamma)). The mask is
recomputed from every step's gradient.

Defaults (the paper's setting): every parameter of the model trains (GMT is full fine-tuning: embeddings,
norms, head and all linears; `target_modules` restricts the mask and the training to named linears), the masked
gradient goes through the run's `train.optimizer` (AdamW, `optimizer_state: dense`; its momentum keeps moving
entries selected in earlier steps), and `mask_ratio` is the paper's hyper-parameter: the FRACTION OF ENTRIES
MASKED (dropped), smallest |Gamma| first. Default 0.2, a mild ratio; the paper reports GMT insensitive to it
(its text giving the main setting could not be read here). `optimizer_state: lazy` instead uses a masked AdamW
whose moments, weight decay and update touch only the kept entries (exactly the kept entries change).
The loop clips before the optimizer step, so the clipping norm is that of the full gradient. The mask is
computed after gradient accumulation (and DDP's all-reduce), inside the optimizer step, so every process keeps
the same entries. Entry masks need no state. Sub-matrix (block) selection is SMT, `tunelab.methods.smt`.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field

from tunelab.methods.registry import Method, MethodOptions, register


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose update is restricted, per parameter, to a boolean mask chosen at every step.

    `select(params, grads) -> masks` is called once per step with the parameters (of groups with
    "masked": True) that have a gradient; a mask of None means a dense update. Entries outside the mask
    are not touched at all: weights, exp_avg and exp_avg_sq keep their exact values. With every mask
    all-True the update equals torch.optim.AdamW's (tested).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 select: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor | None]] | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, masked=True))
        self.select = select

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        masked = [p for g in self.param_groups if g["masked"] for p in g["params"] if p.grad is not None]
        masks = dict(zip(map(id, masked), self.select(masked, [p.grad for p in masked]))) if self.select else {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
                mask = masks.get(id(p))
                if mask is None:  # dense: the same arithmetic as torch.optim.AdamW (single-tensor path)
                    w, g, m, v = p, p.grad, state["exp_avg"], state["exp_avg_sq"]
                else:  # gather the k masked entries [k], update them, scatter back
                    w, g, m, v = p[mask], p.grad[mask], state["exp_avg"][mask], state["exp_avg_sq"][mask]
                w.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
                w.addcdiv_(m, denom, value=-group["lr"] / bc1)
                if mask is not None:
                    p[mask], state["exp_avg"][mask], state["exp_avg_sq"][mask] = w, m, v
        return loss


def kept_mask(grad: torch.Tensor, mask_ratio: float) -> torch.Tensor | None:
    """Entries of `grad` kept by GMT: |g| strictly above the k-th smallest |g|, k = round(mask_ratio * numel)
    (n - k entries when there are no ties). None = keep everything (k = 0)."""
    k = round(mask_ratio * grad.numel())
    if k <= 0:
        return None
    a = grad.detach().abs()
    thr = torch.kthvalue(a.flatten().float(), k).values  # the k-th smallest |g|
    return a > thr


@register("gmt", paper="https://arxiv.org/abs/2406.15330")
class GMT(Method):
    trains = "every parameter, each step only the entries with the largest accumulated gradient"

    class Config(MethodOptions):
        mask_ratio: float = Field(0.2, ge=0, lt=1, description="Fraction of each tensor's gradient entries masked "
                                                               "(smallest |gradient| first), the paper's ratio.")
        target_modules: list[str] | None = Field(None, description="null = every parameter (full fine-tuning, the "
                                                                   "paper); else Linear modules (name suffixes) "
                                                                   "whose weights train, masked.")
        optimizer_state: Literal["dense", "lazy"] = Field("dense", description="The masked gradient into "
                                                                               "train.optimizer (the paper), or a "
                                                                               "masked AdamW.")

    def prepare(self, model):
        targets = self.config.target_modules
        self._names = {}
        for mod_name, mod in model.named_modules():
            if targets is not None and isinstance(mod, torch.nn.Linear) and mod_name.split(".")[-1] in targets:
                self._names[id(mod.weight)] = f"{mod_name}.weight"
        if targets is None:
            self._names = {id(p): n for n, p in model.named_parameters()}
        if not self._names:
            raise ValueError(f"method {self.name}: no Linear module matches {targets}")
        for p in model.parameters():
            p.requires_grad_(id(p) in self._names)
        return model

    def select(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [kept_mask(g, self.config.mask_ratio) for g in grads]

    def build_optimizer(self, model, train_config):
        from tunelab.train.optim import build_optimizer

        groups = self.param_groups(model, train_config.weight_decay)
        if self.config.optimizer_state == "lazy":
            return MaskedAdamW([g for g in groups if g["params"]], lr=train_config.lr, betas=train_config.betas,
                               weight_decay=train_config.weight_decay, select=self.select)
        opt = build_optimizer(groups, train_config)

        def mask_grads(optimizer, args, kwargs):  # dense: mask the gradient, then the plain optimizer step
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            for p, m in zip(params, self.select(params, [p.grad for p in params])):
                if m is not None:
                    p.grad.mul_(m)

        opt.register_step_pre_hook(mask_grads)
        return opt
