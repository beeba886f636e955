"""`perplexity`: perplexity of the response under a model, exp(mean token loss of A given Q).

The plain baseline of the data-selection papers (e.g. Li et al. 2024, Cherry LLM,
https://arxiv.org/abs/2308.12032, Table 1). Lower is preferred by default: the examples the model finds
most likely (GRAPE's criterion, see the `grape` selector); `descending: true` keeps the hardest instead.
`conditional: false` scores ppl(A) without the instruction.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tunelab.selection.registry import ScoreOutput, Scorer, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions, mean_losses, response_losses


class PerplexityOptions(LMScorerOptions):
    conditional: bool = Field(True, description="ppl(A|Q) (true) or ppl(A) with the instruction removed (false).")


@register_scorer("perplexity", paper="https://arxiv.org/abs/2308.12032")
class Perplexity(Scorer):
    Config = PerplexityOptions
    higher_is_better = False

    def score(self, examples, ctx) -> ScoreOutput:
        cfg = self.config
        cond, uncond = response_losses(examples, cfg, ctx, conditional=cfg.conditional,
                                       unconditional=None if cfg.conditional else "empty_turn", desc="perplexity")
        loss = mean_losses(cond if cfg.conditional else uncond)
        return ScoreOutput(np.exp(loss), columns={"mean_loss": loss})

    def identity(self, ctx):
        return ctx.model_identity(self.config.model)
