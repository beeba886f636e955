"""`kcenter`: greedy k-center in embedding space (Gonzalez 1985), the diversity selector of DiverseEvol.

Wu et al. 2023, "Self-Evolved Diverse Data Sampling for Efficient Instruction Tuning",
https://arxiv.org/abs/2311.08182. Start from one point (the best-scored if there are scores, else a
seeded random one), then repeatedly add the point farthest from every chosen center. The covering radius
max_i min_{c in S} ||x_i - x_c|| is within a factor 2 of the optimal k-center radius. Distances are
Euclidean on unit embeddings (monotone in cosine similarity). O(N k d) time, O(N) extra memory.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tunelab.selection.registry import Pool, Selector, SelectorOptions, register_selector


class KCenterOptions(SelectorOptions):
    start: Literal["best", "random"] = Field("best", description="First center: the best-scored point (random "
                                                                 "when there are no scores) or a seeded random one.")


def greedy_k_center(x: np.ndarray, k: int, first: int) -> tuple[np.ndarray, float]:
    """x [N, d] -> (center indices [k] in order of choice, covering radius of the chosen set)."""
    chosen = [first]
    dist = np.linalg.norm(x - x[first], axis=1)  # [N] distance to the nearest chosen center
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))  # ties: lowest index
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return np.asarray(chosen, dtype=np.int64), float(dist.max())


def covering_radius(x: np.ndarray, centers) -> float:
    d = np.linalg.norm(x[:, None, :] - x[np.asarray(centers)][None, :, :], axis=2)  # [N, k]
    return float(d.min(axis=1).max())


@register_selector("kcenter", paper="https://arxiv.org/abs/2311.08182")
class KCenter(Selector):
    Config = KCenterOptions
    needs_embeddings = True

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        if self.config.start == "best" and pool.scores is not None:
            first = int(np.argmax(pool.scores))
        else:
            first = int(np.random.default_rng(pool.seed).integers(len(pool)))
        centers, radius = greedy_k_center(pool.embeddings.astype(np.float64), budget, first)
        pool.report["covering_radius"] = radius
        return centers
