"""Naive sequential fine-tuning: each stage simply continues training on the next task.

The lower reference of continual learning (catastrophic forgetting: McCloskey & Cohen 1989; for LLMs e.g.
Luo et al. 2023, https://arxiv.org/abs/2308.08747). Same as giving no strategy at all.
"""

from __future__ import annotations

from tunelab.continual.strategies.base import Strategy, register_strategy


@register_strategy("naive", paper="https://arxiv.org/abs/2308.08747")
class Naive(Strategy):
    """Sequential fine-tuning with no protection against forgetting."""
