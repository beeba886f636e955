"""`cluster_rank`: Clustering and Ranking (CaR), quality within diversity.

Ge et al. 2024, "Clustering and Ranking: Diversity-preserved Instruction Selection through Expert-aligned
Quality Estimation", https://arxiv.org/abs/2402.18191. The embeddings are clustered by k-means (k-means++
seeding, Lloyd iterations; k = sqrt(N / 2) by default, CaR's choice); the `per_cluster` best-scored
examples of every cluster are taken first (diversity), then the rest of the budget goes to the best-scored
remaining examples overall (quality). If the per-cluster picks alone exceed the budget, the best of them
are kept.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tunelab.selection.registry import Pool, Selector, SelectorOptions, register_selector
from tunelab.selection.selectors.simple import ranked


class ClusterRankOptions(SelectorOptions):
    n_clusters: int | None = Field(None, ge=1, description="k of k-means; null = round(sqrt(N / 2)).")
    per_cluster: int = Field(1, ge=1, description="Best-scored examples taken from every cluster first.")
    iterations: int = Field(50, ge=1, description="Most Lloyd iterations.")


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """x [N, d] -> (labels [N], centers [k, d]); k-means++ seeding, Lloyd until assignments stop changing."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(k - 1):  # k-means++: next center with probability ~ squared distance to the nearest one
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centers.append(x[rng.choice(len(x), p=p)])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    c = np.stack(centers)
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        dist = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :]  # [N, k]
        new = dist.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    return labels, c


@register_selector("cluster_rank", paper="https://arxiv.org/abs/2402.18191")
class ClusterRank(Selector):
    Config = ClusterRankOptions
    needs_scores = True
    needs_embeddings = True

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        n = len(pool)
        k = min(n, self.config.n_clusters or max(1, round((n / 2) ** 0.5)))
        labels, _ = kmeans(pool.embeddings, k, pool.seed, self.config.iterations)
        order = ranked(pool.scores)
        first: list[int] = []
        taken_per = np.zeros(k, dtype=int)
        for i in order:  # best-first, so each cluster's picks are its best and `first` is ranked by score
            if taken_per[labels[i]] < self.config.per_cluster:
                taken_per[labels[i]] += 1
                first.append(int(i))
        chosen = first[:budget]
        seen = set(chosen)
        chosen += [int(i) for i in order if int(i) not in seen][: budget - len(chosen)]
        pool.report["clusters"] = int(k)
        return np.asarray(chosen, dtype=np.int64)
