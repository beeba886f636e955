"""Instruction-Following Difficulty, in both published variants, named apart.

IFD(Q, A) compares how hard the response A is to predict with and without its instruction Q: a value near
1 means the instruction barely helps (the pair is badly aligned, or A is generic), a low value means A is
easy once Q is known. Both papers keep the HIGHEST-IFD samples and drop those with IFD >= 1 (the
instruction makes the answer harder: misaligned pairs).

  ifd_loss  = mean loss(A | Q) / mean loss(A)            Cherry LLM, Li et al. 2024,
                                                         https://arxiv.org/abs/2308.12032 (s(A|Q) / s(A))
  ifd_ppl   = ppl(A | Q) / ppl(A) = exp(mean loss(A|Q) - mean loss(A))
                                                         Superfiltering, Li et al. 2024,
                                                         https://arxiv.org/abs/2402.00530 (scored with a
                                                         small proxy such as GPT-2: weak-to-strong)

Both terms score exactly the same answer tokens: the conditional pass is the training rendering (chat
template, last assistant turn); the unconditional pass replaces everything before the answer by the
template with an empty user turn (`unconditional: empty_turn`, default) or by a single BOS token
(`unconditional: raw`, the papers' form, which drops the chat template). `model:` picks a proxy model.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tunelab.selection.registry import ScoreOutput, Scorer, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions, mean_losses, response_losses


class IFDOptions(LMScorerOptions):
    drop_ge_1: bool = Field(True, description="Samples with IFD >= 1 are no candidates (both papers' rule).")
    unconditional: Literal["empty_turn", "raw"] = Field(
        "empty_turn",
        description="Context of the A-alone pass: the template with an empty user turn, or one BOS token.")


def ifd_from_losses(cond: np.ndarray, uncond: np.ndarray, variant: str) -> float:
    """IFD of one example from its per-token answer losses with (cond) and without (uncond) the instruction."""
    mc, mu = float(np.mean(cond)), float(np.mean(uncond))
    if variant == "ppl":
        return float(np.exp(mc - mu))  # exp(mc) / exp(mu) without overflow
    return mc / mu if mu > 0 else float("inf")


class _IFD(Scorer):
    Config = IFDOptions
    variant = ""

    def score(self, examples, ctx) -> ScoreOutput:
        cond, uncond = response_losses(examples, self.config, ctx, unconditional=self.config.unconditional,
                                       desc=self.name)
        values = np.array([ifd_from_losses(c, u, self.variant) for c, u in zip(cond, uncond)])
        valid = np.isfinite(values) & ((values < 1) if self.config.drop_ge_1 else True)
        return ScoreOutput(values, valid, columns={"loss_a_given_q": mean_losses(cond), "loss_a": mean_losses(uncond)})

    def identity(self, ctx):
        return ctx.model_identity(self.config.model)


@register_scorer("ifd_ppl", paper="https://arxiv.org/abs/2402.00530")
class IFDPerplexity(_IFD):
    """ppl(A|Q) / ppl(A) (Superfiltering)."""

    variant = "ppl"


@register_scorer("ifd_loss", paper="https://arxiv.org/abs/2308.12032")
class IFDLoss(_IFD):
    """mean loss(A|Q) / mean loss(A) (Cherry LLM)."""

    variant = "loss"
