"""GaLore: full-parameter training with Adam state kept in a low-rank projection of the gradient.

Zhao et al. 2024, https://arxiv.org/abs/2403.03507. Update rule per targeted matrix W [m, n] with
gradient G: P = top-r singular vectors of G (refreshed every T steps), R = P^T G (or G P: the smaller
side), Adam moments on R, W <- W - lr * scale * P @ (m_hat / (sqrt(v_hat) + eps)); other parameters
(embeddings, norms) get plain Adam in the same optimizer. Implemented by galore-torch's `GaLoreAdamW`
(the authors' package) through `build_optimizer`, with a state_dict that checkpoints load with
`torch.load(weights_only=True)` (the projector object becomes its orthogonal-matrix tensor).

Defaults: rank 128, update_proj_gap T=200, scale 0.25, proj_type "std" (the paper's LLaMA settings);
targets the attention and MLP projections, as the paper does. Every parameter trains (GaLore is
full-parameter learning); eps is galore-torch's default 1e-6. Memory: Adam state of a targeted [m, n]
matrix is 2 * r * max(m, n) instead of 2 * m * n (gradients are still full size).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Method, MethodOptions, register


def galore_adamw_class():
    """GaLoreAdamW with a weights_only-loadable state_dict (the projector stored as tensors)."""
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    class CheckpointableGaLoreAdamW(GaLoreAdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, no_deprecation_warning=True, **kwargs)

        def state_dict(self):
            sd = super().state_dict()
            packed = {}
            for i, s in sd["state"].items():
                s = dict(s)  # torch's state_dict shares the live dicts: copy before editing
                proj = s.pop("projector", None)
                if proj is not None:
                    s["galore_ortho"] = proj.ortho_matrix  # Tensor, or [A, B] for proj_type "full"
                packed[i] = s
            return {**sd, "state": packed}

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                if "rank" not in group:
                    continue
                for p in group["params"]:
                    s = self.state.get(p)
                    if s and "galore_ortho" in s:
                        proj = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                               scale=group["scale"], proj_type=group["proj_type"])
                        proj.ortho_matrix = s.pop("galore_ortho")
                        s["projector"] = proj

    return CheckpointableGaLoreAdamW


@register("galore", paper="https://arxiv.org/abs/2403.03507")
class GaLore(Method):
    trains = "every parameter, with Adam state in a low-rank gradient projection"
    class Config(MethodOptions):
        rank: int = Field(128, ge=1, description="Rank r of the gradient projection.")
        update_proj_gap: int = Field(200, ge=1, description="Steps T between projection refreshes (SVD of G).")
        scale: float = Field(0.25, gt=0, description="Scale alpha of the projected-back update.")
        proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field("std", description="Projection side.")
        target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                          description="Linear modules (name suffixes) whose weights are projected.")

    def prepare(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        self._targets = {id(m.weight) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in self.config.target_modules}
        if not self._targets:
            raise ValueError(f"method galore: no Linear module matches {self.config.target_modules}")
        return model

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        """[GaLore group (targeted matrices), other matrices (decay), 1-d params (no decay)]."""
        c = self.config
        galore, decay, no_decay = [], [], []
        for p in model.parameters():
            if p.requires_grad:
                (galore if id(p) in self._targets else decay if p.ndim >= 2 else no_decay).append(p)
        return [
            {"params": galore, "weight_decay": weight_decay, "rank": c.rank, "update_proj_gap": c.update_proj_gap,
             "scale": c.scale, "proj_type": c.proj_type},
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def build_optimizer(self, model, train_config):
        groups = [g for g in self.param_groups(model, train_config.weight_decay) if g["params"]]
        return galore_adamw_class()(groups, lr=train_config.lr, betas=tuple(train_config.betas),
                                    weight_decay=train_config.weight_decay)
