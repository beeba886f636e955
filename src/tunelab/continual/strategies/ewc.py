"""EWC: elastic weight consolidation, a quadratic penalty weighted by the diagonal Fisher information.

Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796; online EWC: Schwarz et al. 2018 (Progress &
Compress), https://arxiv.org/abs/1805.06370.

  penalty (added to the mean loss)   (weight / 2) * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2
  F_t     diagonal empirical Fisher after stage t: the mean over `fisher_samples` training examples of the
          stage (new task only) of the squared gradient of the example's loss (its token-mean loss for
          SFT), per parameter; fisher_batch_size > 1 squares mini-batch gradients instead (cheaper, smaller)
  theta*_t  the weights at the end of stage t
  online  (default) one running Fisher F <- decay * F + F_t and one anchor theta* (the latest): memory of
          one extra copy of the trainable weights x2, whatever the number of stages; offline keeps every
          (F_t, theta*_t) pair, as the original paper does.
Only parameters trainable in the current stage enter the penalty (for LoRA: the adapter; for full fine-tuning:
every weight). No penalty in the first stage.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.continual.strategies.base import (
    Strategy,
    StrategyOptions,
    register_strategy,
    snapshot,
    trainable_params,
)


def quadratic_penalty(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor],
                      weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k w_k (theta_k - anchor_k)^2 over the names present in both `params` and `anchors` (w = 1 when
    `weights` is None). Each tensor pair has the parameter's shape; the sum is fp32."""
    total = None
    for n, p in params.items():
        if n not in anchors:
            continue
        d = p.float() - anchors[n].to(p.device)
        term = (d * d * weights[n].to(p.device)).sum() if weights is not None else (d * d).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def diagonal_fisher(model, objective, batches: list[dict[str, torch.Tensor]], params: dict[str, torch.nn.Parameter],
                    precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Mean over `batches` of grad(loss_b)^2 per parameter, loss_b = the objective's mean loss on batch b
    (one example per batch gives the empirical Fisher). Runs in eval mode (no dropout); gradients of the
    model are cleared before and after. Returns fp32 tensors shaped like the parameters."""
    from tunelab.core.precision import autocast_context

    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, precision):
            out = objective.compute(model, batch, None)
        loss = out.loss_sum / torch.as_tensor(out.n_units).clamp(min=1)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    for n in fisher:
        fisher[n] /= max(len(batches), 1)
    model.train(was_training)
    return fisher


@register_strategy("ewc", paper="https://arxiv.org/abs/1612.00796")
class EWC(Strategy):
    """Diagonal-Fisher quadratic penalty towards the weights of earlier stages (online by default)."""

    class Config(StrategyOptions):
        weight: float = Field(1000.0, ge=0, description="lambda: strength of the penalty (its scale follows the "
                                                        "Fisher's, which is small for token-mean losses).")
        online: bool = Field(True, description="One running Fisher and anchor (Schwarz et al.) instead of one per "
                                               "stage.")
        decay: float = Field(1.0, ge=0, le=1, description="Online mode: gamma in F <- gamma F + F_t.")
        fisher_samples: int = Field(64, ge=1, description="Training examples of the stage the Fisher is estimated on.")
        fisher_batch_size: int = Field(1, ge=1, description="Examples per gradient (1 = per-example empirical "
                                                            "Fisher).")

    def __init__(self, config=None):
        super().__init__(config)
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (Fisher, anchor)
        self.params: dict[str, torch.nn.Parameter] = {}

    def before_stage(self, ctx, model, stage):
        self.params = trainable_params(model)

    def loss_terms(self, model, batch):
        if not self.terms or self.config.weight == 0:
            return {}
        total = sum(quadratic_penalty(self.params, anchor, fisher) for fisher, anchor in self.terms)
        return {"penalty": 0.5 * self.config.weight * total}

    def after_stage(self, ctx, model, stage):
        from tunelab.data.batching import COLLATORS

        data = ctx.train_data[stage][: self.config.fisher_samples]
        bs = self.config.fisher_batch_size
        collate = COLLATORS[ctx.objective.batch_kind]
        batches = [collate(data[i: i + bs], ctx.pad_id) for i in range(0, len(data), bs)]
        params = trainable_params(model)
        fisher = diagonal_fisher(model, ctx.objective, batches, params, ctx.precision)
        self.update(fisher, snapshot(params))

    def update(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        """Add a stage's Fisher and anchor: online F <- decay * F + F_t (anchor replaced), else appended."""
        if self.config.online and self.terms:
            old_f, _ = self.terms[0]
            merged = {n: f + self.config.decay * old_f[n] if n in old_f else f for n, f in fisher.items()}
            merged.update({n: self.config.decay * f for n, f in old_f.items() if n not in fisher})
            old_anchor = self.terms[0][1]
            self.terms = [(merged, {**old_anchor, **anchor})]
        else:
            self.terms.append((fisher, anchor))

    def state(self):
        tensors = {}
        for t, (fisher, anchor) in enumerate(self.terms):
            tensors.update({f"{t}/fisher/{n}": v for n, v in fisher.items()})
            tensors.update({f"{t}/anchor/{n}": v for n, v in anchor.items()})
        return tensors, {"n_terms": len(self.terms)}

    def load_state(self, tensors, meta, model):
        self.terms = []
        for t in range(int(meta.get("n_terms", 0))):
            fisher = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{t}/fisher/")}
            anchor = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{t}/anchor/")}
            self.terms.append((fisher, anchor))
