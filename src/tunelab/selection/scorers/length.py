"""`length`: the response's length, the "Long Is More for Alignment" baseline.

Zhao et al. 2024, https://arxiv.org/abs/2402.04833: fine-tuning on the 1,000 examples with the longest
responses is a tough baseline for far more elaborate selectors. Higher is preferred.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tunelab.data.formats import TextExample
from tunelab.selection.registry import ScoreOutput, Scorer, ScorerOptions, as_chat, register_scorer


class LengthOptions(ScorerOptions):
    unit: Literal["tokens", "words", "chars"] = Field("tokens", description="tokens of the scoring model's "
                                                                            "tokenizer, words, or characters.")
    model: str | None = Field(None, description="Tokenizer for unit=tokens: null = the model being tuned.")


@register_scorer("length", paper="https://arxiv.org/abs/2402.04833")
class Length(Scorer):
    Config = LengthOptions
    needs_prompt = False

    def score(self, examples, ctx) -> ScoreOutput:
        texts = [ex.text if isinstance(ex, TextExample) else as_chat(ex).messages[-1]["content"] for ex in examples]
        if self.config.unit == "chars":
            values = [len(t) for t in texts]
        elif self.config.unit == "words":
            values = [len(t.split()) for t in texts]
        else:
            tok = ctx.tokenizer(self.config.model)
            values = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        return ScoreOutput(np.asarray(values, dtype=np.float64))

    def identity(self, ctx):
        return ctx.model_identity(self.config.model) if self.config.unit == "tokens" else {}
