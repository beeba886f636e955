"""L2 to the previous stage's weights: (weight / 2) * ||theta - theta_{s-1}||^2 added to the mean loss.

EWC with an identity Fisher: the "L2" baseline of Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796
(Fig. 2A). theta_{s-1} are the trainable weights at the start of stage s (the end of the previous stage);
no penalty in the first stage.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.continual.strategies.base import (
    Strategy,
    StrategyOptions,
    register_strategy,
    snapshot,
    trainable_params,
)
from tunelab.continual.strategies.ewc import quadratic_penalty


@register_strategy("l2", paper="https://arxiv.org/abs/1612.00796")
class L2(Strategy):
    """Quadratic pull towards the previous stage's weights."""

    class Config(StrategyOptions):
        weight: float = Field(1.0, ge=0, description="lambda of (lambda/2) ||theta - theta_prev||^2.")

    def __init__(self, config=None):
        super().__init__(config)
        self.params, self.anchor = {}, {}

    def before_stage(self, ctx, model, stage):
        self.params = trainable_params(model)
        self.anchor = snapshot(self.params) if stage > 0 else {}

    def loss_terms(self, model, batch):
        if not self.anchor:
            return {}
        return {"penalty": 0.5 * self.config.weight * quadratic_penalty(self.params, self.anchor)}
