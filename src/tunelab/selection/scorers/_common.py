"""Options and passes shared by the scorers that run a causal LM (perplexity, IFD, judge, embedding: lm)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tunelab.selection.context import ScoringContext
from tunelab.selection.lm import pad_id_of, response_input, token_losses
from tunelab.selection.registry import ScorerOptions, as_chat


class LMScorerOptions(ScorerOptions):
    model: str | None = Field(None, description="Scoring model: null = the model being tuned; a path, hub id or "
                                                "alias = a (smaller) proxy model (Superfiltering's weak-to-strong).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    max_length: int = Field(512, ge=8, description="Tokens per sequence (the prompt is cut from the left).")
    max_response_tokens: int = Field(384, ge=1, description="Response tokens scored (the first ones).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype of the forward passes; auto: bf16 where the device computes it natively, "
        "else fp32 (fp16 on GPUs without bf16).")


def response_losses(examples: list, cfg: LMScorerOptions, ctx: ScoringContext, *, conditional: bool = True,
                    unconditional: str | None = None, desc: str = "score"):
    """Per-token losses of each example's response: (given the prompt, without it) — either may be None."""
    tok, model = ctx.tokenizer(cfg.model), ctx.lm(cfg.model)
    inputs = [response_input(tok, as_chat(ex), max_length=cfg.max_length,
                             max_response_tokens=cfg.max_response_tokens, unconditional=unconditional or "empty_turn")
              for ex in examples]
    common = dict(pad_id=pad_id_of(tok), batch_size=cfg.batch_size, precision=cfg.precision, progress=ctx.progress)
    cond = uncond = None
    if conditional:
        cond = token_losses(model, [r.cond_ids for r in inputs], [r.cond_start for r in inputs],
                            desc=f"{desc} A|Q", **common)
    if unconditional is not None:
        uncond = token_losses(model, [r.uncond_ids for r in inputs], [r.uncond_start for r in inputs],
                              desc=f"{desc} A", **common)
    return cond, uncond


def mean_losses(losses: list[np.ndarray]) -> np.ndarray:
    return np.array([float(np.mean(x)) for x in losses], dtype=np.float64)
