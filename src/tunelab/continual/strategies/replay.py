"""Experience replay: a buffer of earlier tasks' training examples, mixed into every later stage.

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning", https://arxiv.org/abs/1902.10486
(reservoir sampling of the buffer: Vitter 1985, Algorithm R).

  buffer     reservoir of at most `buffer_size` examples over everything trained so far: the k-th example
             of the stream (k counted from 0 over all stages) enters a full buffer with probability
             buffer_size / (k + 1), replacing a uniformly chosen slot, so every example seen is in the
             buffer with the same probability;
  mixing     stage s > 0 trains on its n_s new examples plus round(n_s * ratio / (1 - ratio)) examples
             drawn from the buffer (without replacement while the buffer is large enough), so that `ratio`
             is the fraction of replayed examples in the stage's data. The loop shuffles the union.
With `train.max_steps` set, a stage keeps its number of steps (replay displaces new examples); with epochs,
the stage grows by the replayed examples. Buffer entries are (stage, example index) pairs (JSON state);
the draws are functions of (seed, stage) only, so a resumed stream replays the same examples.
"""

from __future__ import annotations

import random

from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyOptions, register_strategy


def reservoir_add(buffer: list, n_seen: int, items: list, size: int, rng: random.Random) -> int:
    """Algorithm R: offer `items` to a reservoir of capacity `size` that has seen `n_seen` items; returns the
    new count. Mutates `buffer`."""
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
        else:
            j = rng.randrange(n_seen + 1)  # uniform in [0, n_seen]
            if j < size:
                buffer[j] = item
        n_seen += 1
    return n_seen


def n_replay(n_new: int, ratio: float) -> int:
    """Replayed examples that make `ratio` of a stage of `n_new` new examples."""
    return round(n_new * ratio / (1.0 - ratio))


@register_strategy("replay", paper="https://arxiv.org/abs/1902.10486")
class Replay(Strategy):
    """Reservoir buffer of earlier tasks' examples mixed into every later stage."""

    class Config(StrategyOptions):
        buffer_size: int = Field(200, ge=1, description="Examples kept over the whole stream (reservoir).")
        ratio: float = Field(0.2, gt=0, lt=1, description="Fraction of each later stage's examples drawn from the "
                                                          "buffer.")
        seed: int = Field(0, description="Seed of the reservoir and of the draws.")

    def __init__(self, config=None):
        super().__init__(config)
        self.buffer: list[tuple[int, int]] = []  # (stage, example index)
        self.n_seen = 0

    def stage_data(self, ctx, stage, data):
        if not self.buffer:
            return data
        k = n_replay(len(data), self.config.ratio)
        rng = random.Random(self.config.seed * 1_000_003 + 2 * stage + 1)
        picks = (rng.sample(self.buffer, k) if k <= len(self.buffer)
                 else [rng.choice(self.buffer) for _ in range(k)])
        return list(data) + [ctx.train_data[s][i] for s, i in picks]

    def after_stage(self, ctx, model, stage):
        rng = random.Random(self.config.seed * 1_000_003 + 2 * stage)
        items = [(stage, i) for i in range(len(ctx.train_data[stage]))]
        self.n_seen = reservoir_add(self.buffer, self.n_seen, items, self.config.buffer_size, rng)

    def state(self):
        return {}, {"buffer": [list(x) for x in self.buffer], "n_seen": self.n_seen}

    def load_state(self, tensors, meta, model):
        self.buffer = [tuple(x) for x in meta.get("buffer", [])]
        self.n_seen = int(meta.get("n_seen", 0))
