"""LIFT: fine-tune only the principal weights — the largest entries of a low-rank approximation of W.

Liu et al. 2025, "LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for
Reasoning-Focused Supervised Fine-Tuning", https://arxiv.org/abs/2506.00772. Update rule per targeted
matrix W [out, in]: W_r = U_r S_r V_r^T (rank-r SVD), M = top-k(|W_r|), W <- W - AdamW step on (dL/dW * M);
M is recomputed from the current W every `update_interval` steps.

Defaults: rank 32 (the authors' setting for Llama-3.2-1B, the closest to SmolLM2's size), density 0.05
(the paper's "top 5%"; `budget_rank` instead gives k = (out + in) * budget_rank, a LoRA-sized budget as
in the authors' code), update_interval 400 (their 1B-8B setting). Targets: the attention and MLP
projections; everything else (embeddings, norms, LM head) is frozen, as in the paper.

Implementation: the mask is a bool buffer `lift_mask` on each targeted Linear, a gradient hook
(`register_hook`) multiplies dL/dW by it, and at each refresh the Adam moments outside the new mask are
zeroed (entries that stay keep theirs, entries that enter start at zero, as the authors' SparseAdamW
does). An entry outside the mask then has zero gradient and zero moments, so AdamW leaves it exactly
unchanged; the masked matrices get weight_decay 0, since decoupled decay would move every entry.
The masks travel with checkpoints inside `trainable_state_dict()` (keys `<module>.lift_mask`): they are
too large for the JSON method state, and are needed to resume between refreshes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Method, MethodOptions, register

log = logging.getLogger(__name__)

MASK = "lift_mask"


def principal_mask(w: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    """Bool mask [out, in] of the k largest |entries| of the rank-`rank` SVD approximation of w."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # u [out, q], s [q], vh [q, in]
    r = min(rank, s.numel())
    approx = (u[:, :r] * s[:r]) @ vh[:r]  # [out, in]
    flat = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    flat[torch.topk(approx.abs().flatten(), k, sorted=False).indices] = True
    return flat.view_as(w)


@register("lift", paper="https://arxiv.org/abs/2506.00772")
class LIFT(Method):
    trains = "the top entries of a low-rank approximation of each targeted W"
    class Config(MethodOptions):
        rank: int = Field(32, ge=1, description="Rank of the SVD approximation that ranks the entries.")
        density: float = Field(0.05, gt=0, le=1, description="Fraction of entries of each matrix that train.")
        budget_rank: int | None = Field(None, ge=1, description="If set, k = (out+in)*budget_rank entries instead.")
        update_interval: int = Field(400, ge=1, description="Steps between mask refreshes.")
        target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                          description="Linear modules (name suffixes) to fine-tune sparsely.")

    def k_of(self, w: torch.Tensor) -> int:
        if self.config.budget_rank is not None:
            return min((w.shape[0] + w.shape[1]) * self.config.budget_rank, w.numel())
        return max(1, round(self.config.density * w.numel()))

    def prepare(self, model):
        self._modules = {n: m for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in self.config.target_modules}
        if not self._modules:
            raise ValueError(f"method lift: no Linear module matches {self.config.target_modules}")
        for p in model.parameters():
            p.requires_grad_(False)
        self._hooks = []
        for m in self._modules.values():
            m.weight.requires_grad_(True)
            m.register_buffer(MASK, principal_mask(m.weight, self.config.rank, self.k_of(m.weight)), persistent=False)
            # multiply the gradient by the module's current mask (read at call time: refreshes are in place)
            self._hooks.append(m.weight.register_hook(lambda g, m=m: g * getattr(m, MASK)))
        return model

    def masks(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{MASK}": getattr(m, MASK) for n, m in self._modules.items()}

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        # decoupled weight decay would move the entries outside the mask: none on masked matrices
        return [{"params": [m.weight for m in self._modules.values()], "weight_decay": 0.0}]

    @torch.no_grad()
    def refresh(self, optimizer=None) -> None:
        """Recompute every mask from the current weights; zero the Adam moments outside the new masks."""
        for m in self._modules.values():
            mask = getattr(m, MASK)
            mask.copy_(principal_mask(m.weight, self.config.rank, self.k_of(m.weight)))
            state = optimizer.state.get(m.weight, {}) if optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                t = state.get(key)
                if isinstance(t, torch.Tensor) and t.shape == mask.shape:
                    t.masked_fill_(~mask, 0)
                elif t is not None:
                    log.warning("lift: optimizer state %r has no dense layout; it is not masked", key)

    def on_step_end(self, model, step: int, optimizer) -> None:
        if step % self.config.update_interval == 0:
            self.refresh(optimizer)

    def trainable_state_dict(self, model):
        return {**super().trainable_state_dict(model), **self.masks()}

    def load_trainable_state_dict(self, model, state):
        masks = self.masks()
        with torch.no_grad():
            for key in [k for k in state if k in masks]:
                masks[key].copy_(state[key])
        super().load_trainable_state_dict(model, {k: v for k, v in state.items() if k not in masks})

    def merged_model(self, model):
        for h in self._hooks:
            h.remove()
        for m in self._modules.values():
            delattr(m, MASK)
        self._hooks = []
        return model
