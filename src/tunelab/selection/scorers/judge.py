"""`judge`: the LM rates each example 1..6; the score is the expected rating under the next-token
probabilities of the rating tokens (Deita's scorers, Liu et al. 2024, https://arxiv.org/abs/2312.15685).

Deita trains dedicated complexity and quality scorers and reads their score the same way:
score = sum_k k * p(k) / sum_k p(k) over the tokens "1".."6". Here any chat LM (the model being tuned by
default, or `model:`) is prompted with Deita's prompts; `aspect: complexity` rates the instruction,
`aspect: quality` the response to it. A custom `template` may use {instruction} and {response}.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tunelab.data.encode import render
from tunelab.data.formats import DataError
from tunelab.selection.lm import next_token_logprobs, pad_id_of
from tunelab.selection.registry import ScoreOutput, Scorer, as_chat, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions

PROMPTS = {
    "complexity": "You are a helpful assistant. Please identify the complexity score of the following user query. "
                  "Answer with a single number from 1 (simplest) to 6 (most complex).\n##Query: {instruction}\n"
                  "##Complexity: ",
    "quality": "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
               "Question. Answer with a single number from 1 (worst) to 6 (best).\n#Question#:\n{instruction}\n"
               "#Response#:\n{response}\n##Quality: ",
}


class JudgeOptions(LMScorerOptions):
    aspect: Literal["quality", "complexity"] = Field("quality", description="What is rated (Deita's two scorers).")
    template: str | None = Field(None, description="Prompt with {instruction} and {response}; null = Deita's.")
    scale: int = Field(6, ge=2, le=9, description="Ratings 1..scale, each a single token of the tokenizer.")
    max_chars: int = Field(4000, ge=100, description="Instruction and response are each cut to this many characters.")


def rating_token_ids(tokenizer, scale: int) -> list[int]:
    ids = []
    for k in range(1, scale + 1):
        enc = tokenizer(str(k), add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise DataError(f"judge: the rating {k} is not a single token of this tokenizer ({enc})")
        ids.append(enc[0])
    return ids


def expected_rating(logprobs: np.ndarray) -> np.ndarray:
    """[N, K] log-probabilities of ratings 1..K -> [N] expectation of the rating, renormalised over the K tokens."""
    p = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ np.arange(1, logprobs.shape[1] + 1, dtype=np.float64)


@register_scorer("judge", paper="https://arxiv.org/abs/2312.15685")
class Judge(Scorer):
    Config = JudgeOptions

    def score(self, examples, ctx) -> ScoreOutput:
        cfg = self.config
        tok, model = ctx.tokenizer(cfg.model), ctx.lm(cfg.model)
        template = cfg.template or PROMPTS[cfg.aspect]
        rows = []
        for ex in examples:
            msgs = as_chat(ex).messages
            instruction = "\n".join(m["content"] for m in msgs[:-1] if m["role"] == "user")[: cfg.max_chars]
            prompt = template.format(instruction=instruction, response=msgs[-1]["content"][: cfg.max_chars])
            text = render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            rows.append(tok(text, add_special_tokens=False)["input_ids"][-cfg.max_length:])
        logprobs = next_token_logprobs(model, rows, rating_token_ids(tok, cfg.scale), pad_id=pad_id_of(tok),
                                       batch_size=cfg.batch_size, precision=cfg.precision, progress=ctx.progress,
                                       desc=f"judge {cfg.aspect}")
        # mass on the rating tokens: a low value says the judge did not understand the task
        return ScoreOutput(expected_rating(logprobs), columns={"rating_mass": np.exp(logprobs).sum(axis=1)})

    def identity(self, ctx):
        return ctx.model_identity(self.config.model)
