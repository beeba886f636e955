"""Measurement: how spread out `embedding: lm` vectors are on the built-in model, and what Deita keeps of them.

For the first `--n` (50) records of alpaca-cherry-5pct (../shared/data), SmolLM2-135M-Instruct embeds each
example three ways (last-token state; mean-pooled states; mean-pooled and centred on the pool's mean, the
default), and the script prints the mean pairwise cosine distance and how many examples Deita's filter
(threshold 0.9, scores = reverse file order, budget n/2) keeps. Raw last-token states are nearly parallel, so
Deita can keep almost nothing; see docs/selection.md.

Run:  python benchmarks/embedding_spread.py [--n 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-cherry-5pct" / "cherry_alpaca_5_percent.json"


def main() -> None:
    from tunelab.data.formats import load_records
    from tunelab.data.pipeline import records_to_examples
    from tunelab.recipe import DataConfig, DatasetSpec, ModelConfig
    from tunelab.selection.context import ScoringContext
    from tunelab.selection.registry import Pool, build_scorer, build_selector
    from tunelab.selection.scorers.embedding import mean_cosine_distance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = DatasetSpec(path=args.data, n=args.n)
    examples = records_to_examples(load_records(spec.path, n=spec.n), spec, DataConfig())
    ctx = ScoringContext(model=ModelConfig(name_or_path="smollm2-135m-instruct"), progress=False)
    scores = np.arange(len(examples))[::-1].astype(float)
    for opts in ({"pooling": "last", "center": False}, {"pooling": "mean", "center": False},
                 {"pooling": "mean", "center": True}):
        t0 = time.perf_counter()
        emb = build_scorer("embedding", {"encoder": "lm", "precision": "bf16", **opts}).score(examples, ctx).values
        pool = Pool(examples, scores=scores, raw_scores=scores, embeddings=emb)
        kept = len(build_selector("deita", {"threshold": 0.9}).select(pool, len(examples) // 2))
        print(f"{opts}: mean pairwise cosine distance {mean_cosine_distance(emb):.3f}; deita(0.9) keeps {kept} "
              f"(budget {len(examples) // 2}, pool {len(examples)}); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
