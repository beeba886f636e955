"""The selection report: what was read, dropped and kept, score histograms and diversity, pool vs subset.

Written as report.json (all figures) and report.png (histograms of every score, pool vs subset).
Diversity: with embeddings, the mean pairwise cosine distance of a set and its coverage of the pool
(mean over pool examples of the cosine similarity to the nearest selected one: the facility-location
value); without, the mean pairwise Jaccard distance of word-3-gram shingles. Large sets are sampled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunelab.selection.dedup import example_text, jaccard, shingles

SAMPLE = 1000


def score_stats(values: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {"n": 0}
    hist, _ = np.histogram(v, bins=bins)
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "histogram": hist.tolist()}


def _sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def embedding_diversity(emb: np.ndarray, pool_emb: np.ndarray | None = None) -> dict[str, float]:
    e = emb[_sample(len(emb), SAMPLE)].astype(np.float64)
    sims = e @ e.T
    n = len(e)
    out = {"mean_pairwise_cosine_distance": float(1 - (sims.sum() - np.trace(sims)) / max(n * (n - 1), 1))}
    if pool_emb is not None:
        p = pool_emb[_sample(len(pool_emb), 4 * SAMPLE, 1)].astype(np.float64)
        out["pool_coverage"] = float((p @ emb.astype(np.float64).T).max(axis=1).mean())
    return out


def lexical_diversity(examples: list) -> dict[str, float]:
    idx = _sample(len(examples), 300)
    sets = [shingles(example_text(examples[i]), 3) for i in idx]
    d = [1 - jaccard(sets[a], sets[b]) for a in range(len(sets)) for b in range(a + 1, len(sets))]
    return {"mean_pairwise_jaccard_distance": float(np.mean(d)) if d else 0.0}


def build_report(*, columns: dict[str, np.ndarray], chosen: np.ndarray, pool_examples: list, chosen_examples: list,
                 embeddings: np.ndarray | None, chosen_emb: np.ndarray | None) -> dict[str, Any]:
    """columns: every per-example value over the scored pool ([N] each); chosen: positions in that pool."""
    scores = {}
    for name, v in columns.items():
        v = np.asarray(v, dtype=np.float64)
        finite = v[np.isfinite(v)]
        bins = np.histogram_bin_edges(finite, bins=20) if len(finite) else np.linspace(0, 1, 21)
        scores[name] = {"bins": bins.tolist(), "pool": score_stats(v, bins), "subset": score_stats(v[chosen], bins)}
    if embeddings is not None:
        diversity = {"pool": embedding_diversity(embeddings), "subset": embedding_diversity(chosen_emb, embeddings)}
    else:
        diversity = {"pool": lexical_diversity(pool_examples), "subset": lexical_diversity(chosen_examples)}
    return {"scores": scores, "diversity": diversity}


def plot_histograms(report: dict[str, Any], path: Path) -> Path | None:
    scores = report.get("scores") or {}
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        bins = np.asarray(s["bins"])
        for label, part, color in (("pool", s["pool"], "#bbbbbb"), ("subset", s["subset"], "#1f77b4")):
            if part.get("n"):
                ax.stairs(np.asarray(part["histogram"]) / part["n"], bins, fill=label == "pool", color=color,
                          label=f"{label} (n={part['n']})")
        ax.set_title(name)
        ax.set_ylabel("fraction")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
