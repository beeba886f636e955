"""Surgical fine-tuning: tune a chosen block of the model, or every tensor at a rate set by its relative gradient.

Lee et al. 2022, "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", https://arxiv.org/abs/2210.11466
(reference code: github.com/yoonholee/surgical-finetuning, `main.py`). Two forms, as in the paper:

- the block choice (`layers`, `modules`, `auto_rgn: false`): only the chosen contiguous block trains (the paper
  tunes the first block for input-level shifts, later ones for feature- or output-level shifts); update rule
  W <- AdamW(W, dL/dW) for W in the block, every other W fixed;
- Auto-RGN (`auto_rgn: true`, the default, over the whole model): every tensor W_i trains, its learning rate
  scaled by its relative gradient norm normalised by the largest,
      RGN_i = ||g_i|| / ||W_i||,   lr_i = lr * RGN_i / max_j RGN_j,
  so each step's update concentrates on the tensors whose gradient is largest relative to their size (soft,
  per tensor). Update rule: W_i <- AdamW(W_i, g_i) with learning rate lr_i (decoupled weight decay scaled
  with it, as a per-group lr does).

Defaults: Auto-RGN over every parameter of the model, recomputed at every optimizer step (`rgn_every: 1`) from
that step's gradient (after accumulation and the all-reduce, so every process computes the same weights;
clipping rescales all gradients alike and leaves the ratios unchanged). Departures from the reference code,
which recomputes the weights once per EPOCH from the mean RGN of 5 batches and then builds a new Adam (its
moments reset) over non-batch-norm tensors: here the step's own gradient, Adam's moments persist, and every
tensor takes part (LLMs have no batch norm; norms and embeddings are ordinary tensors). `rgn_every: k` reuses
one step's weights for k steps. The tensors' lrs are applied through one optimizer parameter group per tensor
(`train.optimizer`); the scheduler's lr is restored after each step, so schedules and logging are unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from tunelab.methods.freeze import layer_index, num_layers
from tunelab.methods.registry import Method, MethodOptions, register

log = logging.getLogger(__name__)


def relative_gradient_norms(params: list[torch.Tensor]) -> list[float]:
    """RGN_i = ||g_i|| / ||W_i|| (0 for a tensor without gradient; ||W_i|| floored at 1e-12)."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(0.0)
            continue
        out.append(float(p.grad.detach().float().norm()) / max(float(p.detach().float().norm()), 1e-12))
    return out


def rgn_weights(rgn: list[float]) -> list[float]:
    """Auto-RGN's learning-rate multipliers: RGN_i / max_j RGN_j (all zero if every RGN is zero)."""
    top = max(rgn, default=0.0)
    return [r / top if top > 0 else 0.0 for r in rgn]


@register("surgical", paper="https://arxiv.org/abs/2210.11466")
class Surgical(Method):
    trains = "every tensor at an lr scaled by its relative gradient norm (Auto-RGN), or a chosen block"

    class Config(MethodOptions):
        layers: list[int] | None = Field(None, description="Decoder layers of the block to tune (negative = from the "
                                                           "top); null = the whole model.")
        modules: list[str] = Field(default_factory=list, description="Name substrings of extra parameters to tune "
                                                                     "with the block (embed_tokens, lm_head, norm).")
        auto_rgn: bool = Field(True, description="Scale each tensor's lr by RGN / max RGN at every step (Auto-RGN).")
        rgn_every: int = Field(1, ge=1, description="Steps between re-computations of the Auto-RGN weights.")

    def __init__(self, config=None):
        super().__init__(config)
        self.weights: dict[str, float] = {}  # Auto-RGN multipliers of the last computation, by parameter name
        self.step = 0  # optimizer steps done

    def prepare(self, model):
        c = self.config
        n = num_layers(model)
        block = None
        if c.layers is not None:
            for i in c.layers:
                if not -n <= i < n:
                    raise ValueError(f"method.layers: layer {i} out of range for a model of {n} layers")
            block = {i % n for i in c.layers}
        any_trainable = False
        for name, p in model.named_parameters():
            idx = layer_index(name)
            train = block is None or (idx is not None and idx in block) or any(s in name for s in c.modules)
            p.requires_grad_(train)
            any_trainable |= train
        if not any_trainable:
            raise ValueError("method surgical: the block matches no parameter")
        return model

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        if not self.config.auto_rgn:
            return super().param_groups(model, weight_decay)
        # one group per tensor: each gets its own lr multiplier (matrices decay, 1-d tensors do not)
        return [{"params": [p], "weight_decay": weight_decay if p.ndim >= 2 else 0.0, "name": n}
                for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(self, model, train_config):
        if not self.config.auto_rgn:
            return None
        from tunelab.train.optim import build_optimizer

        opt = build_optimizer(self.param_groups(model, train_config.weight_decay), train_config)
        opt.register_step_pre_hook(self._scale_lrs)
        opt.register_step_post_hook(self._restore_lrs)
        return opt

    def _scale_lrs(self, optimizer, args, kwargs) -> None:
        """Before the update: lr_i = lr * RGN_i / max RGN (recomputed every `rgn_every` steps)."""
        groups = [g for g in optimizer.param_groups if "name" in g]
        if not self.weights or self.step % self.config.rgn_every == 0:
            w = rgn_weights(relative_gradient_norms([g["params"][0] for g in groups]))
            self.weights = {g["name"]: wi for g, wi in zip(groups, w)}
        for g in groups:
            g["scheduled_lr"] = g["lr"]
            g["lr"] = g["lr"] * self.weights.get(g["name"], 0.0)

    def _restore_lrs(self, optimizer, args, kwargs) -> None:
        for g in optimizer.param_groups:
            if "scheduled_lr" in g:
                g["lr"] = g.pop("scheduled_lr")

    def on_step_end(self, model, step: int, optimizer) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights} if self.config.auto_rgn else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.step = int(state.get("step", 0))
            self.weights = {k: float(v) for k, v in state.get("weights", {}).items()}
