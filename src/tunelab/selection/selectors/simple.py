"""The plain selectors: `random` (the baseline every paper must beat), `topk` and `threshold`.

`topk` keeps the `budget` best-scored examples (Cherry LLM / Superfiltering with IFD, Long Is More with
length, AlpaGasus with a judge's rating; e.g. https://arxiv.org/abs/2308.12032). `threshold` keeps every
example whose RAW score lies in [min, max] (the budget, if given, then keeps the best of those).
Ties are broken by position in the file (stable sort), so selections are reproducible.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from tunelab.selection.registry import Pool, Selector, SelectorOptions, register_selector


def ranked(scores: np.ndarray) -> np.ndarray:
    """Indices from most to least preferred (scores oriented: higher = preferred), ties by position."""
    return np.argsort(-scores, kind="stable")


@register_selector("random")
class Random(Selector):
    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        return np.random.default_rng(pool.seed).choice(len(pool), size=budget, replace=False).astype(np.int64)


@register_selector("topk", paper="https://arxiv.org/abs/2308.12032")
class TopK(Selector):
    needs_scores = True

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        return ranked(pool.scores)[:budget].astype(np.int64)


class ThresholdOptions(SelectorOptions):
    min: float | None = Field(None, description="Keep examples whose raw score is >= min.")
    max: float | None = Field(None, description="Keep examples whose raw score is <= max.")

    @model_validator(mode="after")
    def _some_bound(self):
        if self.min is None and self.max is None:
            raise ValueError("threshold needs `min` and/or `max`")
        return self


@register_selector("threshold")
class Threshold(Selector):
    Config = ThresholdOptions
    needs_scores = True
    needs_budget = False

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        raw = pool.raw_scores if pool.raw_scores is not None else pool.scores
        keep = np.ones(len(pool), bool)
        if self.config.min is not None:
            keep &= raw >= self.config.min
        if self.config.max is not None:
            keep &= raw <= self.config.max
        order = [i for i in ranked(pool.scores) if keep[i]]
        return np.asarray(order[:budget] if budget is not None else order, dtype=np.int64)
