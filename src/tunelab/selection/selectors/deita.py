"""`deita`: score-first, diversity-aware selection (Deita's "Repr Filter").

Liu et al. 2024, "What Makes Good Data for Alignment?", https://arxiv.org/abs/2312.15685. Candidates are
visited from the best score down; one is added unless its cosine similarity to anything already selected
exceeds `threshold` (Deita uses 0.9 with LLaMA embeddings; sentence embeddings are less concentrated, so
lower values are common). Stops at the budget; if the pool runs out first, fewer are returned (reported).
Scores: Deita's evol score (`composite` of complexity x quality judges) or any other.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import Field

from tunelab.selection.registry import Pool, Selector, SelectorOptions, register_selector
from tunelab.selection.selectors.simple import ranked

log = logging.getLogger(__name__)


class DeitaOptions(SelectorOptions):
    threshold: float = Field(0.9, ge=-1, le=1, description="Skip a candidate whose cosine similarity to a selected "
                                                           "example is above this.")


def deita_filter(scores: np.ndarray, emb: np.ndarray, budget: int, threshold: float) -> np.ndarray:
    """scores [N] (higher first), emb [N, d] unit rows -> selected indices in order of selection."""
    chosen: list[int] = []
    chosen_emb = np.zeros((budget, emb.shape[1]), dtype=emb.dtype)
    for i in ranked(scores):
        if chosen and float((chosen_emb[: len(chosen)] @ emb[i]).max()) > threshold:
            continue
        chosen_emb[len(chosen)] = emb[i]
        chosen.append(int(i))
        if len(chosen) == budget:
            break
    return np.asarray(chosen, dtype=np.int64)


@register_selector("deita", paper="https://arxiv.org/abs/2312.15685")
class Deita(Selector):
    Config = DeitaOptions
    needs_scores = True
    needs_embeddings = True

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        out = deita_filter(pool.scores, pool.embeddings, budget, self.config.threshold)
        if len(out) < budget:
            log.warning("deita: only %d of %d candidates are below similarity %.2f to each other (budget %d)",
                        len(out), len(pool), self.config.threshold, budget)
        return out
