"""HFT per stage: half fine-tuning with a fresh random half of the parameter blocks for every stage.

Hui et al. 2024, https://arxiv.org/abs/2404.18466. In the paper's continual setting each new task trains a
newly drawn half of the parameters (per category: each layer's attention, MLP and norms, plus the
non-layer parameters) while the other half keeps its value, which is what limits forgetting. This
strategy re-draws the `hft` method's selection at the start of every stage: stage s uses the method's draw of
period s (a pure function of the method's seed and s; stage 0 is the draw the method made itself). Needs
`base.method: {name: hft}` without `switch_every`. Frozen weights stay in full precision (the stream casts
frozen linears to the compute dtype only for adapter methods), since a later stage may train them.
"""

from __future__ import annotations

from tunelab.continual.strategies.base import Strategy, StrategyError, register_strategy


@register_strategy("hft", paper="https://arxiv.org/abs/2404.18466")
class HFTPerStage(Strategy):
    """A new random half of the parameters trains in each stage (the `hft` method re-drawn per stage)."""

    def check(self, ctx):
        m = ctx.recipe.base.method
        if m.name != "hft":
            raise StrategyError(f"strategy hft needs base.method.name: hft (got {m.name!r})")
        if getattr(ctx.method.config, "switch_every", None):
            raise StrategyError("strategy hft re-draws once per stage: leave base.method.switch_every unset")

    def prepare_stage(self, ctx, model, stage):
        method = ctx.method
        # the method's public state API: period s and the active set of its draw for that period
        method.load_state_dict({"period": stage, method.state_key: method.encode(method.draw(model, stage))})
        return model
