"""`grape`: per instruction with several candidate responses, keep the one the target model finds most likely.

Zhang et al. 2025, "The Best Instruction-Tuning Data are Those That Fit", https://arxiv.org/abs/2502.04194.
Records sharing the same prompt (every message before the response) form a group; the best-scored member
of each group is kept. With `scorer: {name: perplexity}` under the model being tuned (lower preferred), that
is the response closest to the model's own distribution, GRAPE's criterion. Length: perplexity is
exp(mean NLL per response token), i.e. the length-normalised likelihood GRAPE compares across responses of
different lengths; a summed log-likelihood would favour the shortest response, so the selector should be fed a
per-token score (perplexity, or a mean log-probability), not a sequence total. Budget: null keeps one per
instruction; a count keeps the best-scored winners.
"""

from __future__ import annotations

import json

import numpy as np

from tunelab.selection.registry import Pool, Selector, as_chat, register_selector
from tunelab.selection.selectors.simple import ranked


def prompt_key(example) -> str:
    from tunelab.data.formats import TextExample

    if isinstance(example, TextExample):
        return json.dumps(["text", example.origin])  # a text record is its own group
    return json.dumps(as_chat(example).messages[:-1], sort_keys=True)


@register_selector("grape", paper="https://arxiv.org/abs/2502.04194")
class Grape(Selector):
    needs_scores = True
    needs_budget = False

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        winners: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for i in ranked(pool.scores):  # best first: the first member seen of each group wins
            key = prompt_key(pool.examples[i])
            sizes[key] = sizes.get(key, 0) + 1
            winners.setdefault(key, int(i))
        pool.report["groups"] = len(winners)
        pool.report["groups_with_choice"] = sum(1 for s in sizes.values() if s > 1)
        keep = set(winners.values())
        chosen = [int(i) for i in ranked(pool.scores) if int(i) in keep]
        return np.asarray(chosen[:budget] if budget is not None else chosen, dtype=np.int64)
