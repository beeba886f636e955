"""GMT / SMT: update only the entries (GMT) or sub-matrix blocks (SMT) with the largest gradient magnitude.

GMT, gradient-mask tuning: Li et al. 2024, https://arxiv.org/abs/2406.15330. Update rule per targeted
matrix W with accumulated step gradient G: M = top-k(|G|) (k = density * numel), W <- W - AdamW update
restricted to M; the mask is recomputed from every step's gradient.
SMT, sparse matrix tuning: He et al. 2024, https://arxiv.org/abs/2405.15525 (`granularity: block`). W is
cut into block_size x block_size sub-matrices (edge blocks smaller); the top density fraction of blocks
by mean |G| is selected and, as in SMT, kept fixed (`reselect_every: 0`) or refreshed every n steps.

Defaults: density 0.1 (our choice: the masking ratio is the hyper-parameter both papers sweep), block
size 64 (SMT uses 256 x 256 blocks on 4096-wide LLaMA; 64 keeps a similar count on 576-wide SmolLM2). Targets: the attention and MLP
projections of every decoder layer; every other parameter is frozen.

Optimizer (`optimizer_state`):
  lazy  (default) a masked AdamW (`MaskedAdamW`, below): moments, weight decay and the update touch only
        the masked entries, whose moments persist while they are out of the mask (lazy Adam, as
        torch.optim.SparseAdam; bias correction uses the parameter's step count). Exactly the k
        selected entries (or the selected blocks) change at every step. `train.optimizer` is not used.
  dense the paper's setting: the masked gradient goes through `train.optimizer` (AdamW), whose momentum
        keeps moving entries selected in earlier steps (exactly k entries change only on the first step).
The loop clips before the optimizer step, so the clipping norm is that of the full gradient.
The mask is computed after gradient accumulation (and DDP's all-reduce), inside the optimizer step, so
every process picks the same entries. Entry masks need no state (they come from the step's gradient);
block selections are saved in `state_dict()` as block-index lists.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from tunelab.methods.lora import DEFAULT_TARGETS
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


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `score` (same shape)."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[torch.topk(score.flatten(), k, sorted=False).indices] = True
    return flat.view_as(score)


def block_scores(grad: torch.Tensor, block: int) -> torch.Tensor:
    """Mean |grad| of each block x block sub-matrix: [ceil(out/b), ceil(in/b)] (edge blocks smaller)."""
    g = grad.detach().abs().float()[None, None]  # [1, 1, out, in]
    return torch.nn.functional.avg_pool2d(g, block, stride=block, ceil_mode=True)[0, 0]


def blocks_to_mask(block_ids: list[int], shape: torch.Size, block: int, device=None) -> torch.Tensor:
    """Entry mask [out, in] of the blocks with flat ids `block_ids` in the [ceil(out/b), ceil(in/b)] grid."""
    rows, cols = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    grid = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    grid[torch.tensor(block_ids, dtype=torch.long, device=device)] = True
    grid = grid.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return grid[: shape[0], : shape[1]].contiguous()


@register("gmt", paper="https://arxiv.org/abs/2406.15330")
class GMT(Method):
    trains = "the entries (or blocks) with the largest gradient of each targeted W"
    class Config(MethodOptions):
        density: float = Field(0.1, gt=0, le=1, description="Fraction of entries (or blocks) updated per matrix.")
        granularity: Literal["entry", "block"] = Field("entry", description="entry = GMT; block = SMT sub-matrices.")
        block_size: int = Field(64, ge=1, description="Side of the SMT sub-matrices (granularity: block).")
        reselect_every: int | None = Field(
            None, ge=0, description="Steps between block re-selections (0 = select once, SMT); entry masks are "
                                    "always per step. null = 1 for entry, 0 for block.")
        optimizer_state: Literal["lazy", "dense"] = Field("lazy", description="Masked (lazy) or plain AdamW state.")
        target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                          description="Linear modules (name suffixes) whose weights are masked.")

        @model_validator(mode="after")
        def _entry_is_per_step(self):
            if self.granularity == "entry" and self.reselect_every not in (None, 1):
                raise ValueError("granularity 'entry' re-selects at every step (GMT); reselect_every must be 1")
            return self

    def __init__(self, config=None):
        super().__init__(config)
        self.blocks: dict[str, list[int]] = {}  # block selection per parameter name (granularity: block)
        self.step = 0  # optimizer steps completed

    @property
    def reselect_every(self) -> int:
        c = self.config
        return c.reselect_every if c.reselect_every is not None else (1 if c.granularity == "entry" else 0)

    def prepare(self, model):
        self._names = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod_name.split(".")[-1] in self.config.target_modules:
                self._names[id(mod.weight)] = f"{mod_name}.weight"
        if not self._names:
            raise ValueError(f"method {self.name}: no Linear module matches {self.config.target_modules}")
        for p in model.parameters():
            p.requires_grad_(id(p) in self._names)
        return model

    def k_of(self, n: int) -> int:
        return max(1, round(self.config.density * n))

    def select(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        masks = []
        for p, g in zip(params, grads):
            if c.granularity == "entry":
                masks.append(topk_mask(g.detach().abs(), self.k_of(g.numel())))
                continue
            name = self._names[id(p)]
            every = self.reselect_every
            if name not in self.blocks or (every and self.step % every == 0):
                scores = block_scores(g, c.block_size)  # [rows, cols]
                self.blocks[name] = sorted(topk_mask(scores, self.k_of(scores.numel())).flatten()
                                           .nonzero().flatten().tolist())
            masks.append(blocks_to_mask(self.blocks[name], p.shape, c.block_size, p.device))
        return masks

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
                p.grad.mul_(m)

        opt.register_step_pre_hook(mask_grads)
        return opt

    def on_step_end(self, model, step: int, optimizer) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "blocks": self.blocks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.step = int(state.get("step", 0))
            self.blocks = {k: [int(i) for i in v] for k, v in state.get("blocks", {}).items()}
