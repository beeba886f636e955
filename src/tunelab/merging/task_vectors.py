"""mergekit's generalized task arithmetic: task_arithmetic, ties, dare_linear and dare_ties as mergekit computes
them (``mergekit.merge_methods.generalized_task_arithmetic``), the default of merge recipes.

It differs from :func:`.ops.ties` / :func:`.ops.dare_ties` (peft's conventions, ``convention: peft``) in three ways:
the sign is elected on the *weighted* task vectors; ``normalize`` divides by the summed weights of the vectors that
agree with it (peft: by their count, weights applied after); ``rescale`` restores each pruned vector's L1 norm
(DARE's paper and peft: ``1 / density``, equal in expectation). With every weight 1 TIES agrees with peft's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .ops import SignMethod, _densities, _f, _weights, check_same_shape, elect_sign, magnitude_prune

Tensor = torch.Tensor

__all__ = ["rescale_l1", "task_vector_merge"]


def rescale_l1(pruned: Tensor, original: Tensor, eps: float = 1e-7) -> Tensor:
    """mergekit's ``rescale``: scale a pruned task vector so its L1 norm equals the unpruned one's,
    ``tau' = m * tau * |tau|_1 / |m * tau|_1`` (left as is when either norm is below ``eps``)."""
    before, after = original.abs().sum(), pruned.abs().sum()
    if before < eps or after < eps:
        return pruned
    return pruned * (before / after)


def task_vector_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsify: Literal["magnitude", "random"] | None = None,
    consensus: SignMethod | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_linear, dare_ties), returning the
    merged task vector (the merged weight is ``base + result``).

    Per task vector: prune (``magnitude``: TIES' top-``density`` trim keeping at least one entry; ``random``:
    DARE's Bernoulli(``density``) mask drawn from ``generator``), then, with ``rescale``, match the L1 norm of
    the unpruned vector (:func:`rescale_l1`; DARE's ``1 / density`` in expectation). Then
    ``s_i = w_i t_i``; with ``consensus`` elect ``gamma = sign(sum_i s_i)`` (``total``; ``frequency``: the
    majority of signs) on the WEIGHTED vectors and keep ``m_i = [sign s_i = gamma]``;
    ``tau = lam * sum_i m_i s_i / D`` with ``D = sum_i m_i w_i`` (no consensus: ``sum_i w_i``; a zero divisor is
    1) when ``normalize``, else ``D = 1``. ``normalize`` makes TIES a weighted disjoint mean.
    """
    check_same_shape(deltas)
    n = len(deltas)
    w = _weights(n, weights)
    pruned = []
    for d, p in zip(deltas, _densities(n, densities)):
        d = _f(d)
        if sparsify == "magnitude":
            x = magnitude_prune(d, p, min_keep=1)
        elif sparsify == "random":
            x = d if p >= 1.0 else d * torch.bernoulli(torch.full_like(d, p), generator=generator)
        elif sparsify is None:
            x = d
        else:
            raise ValueError(f"unknown sparsification {sparsify!r}")
        pruned.append(rescale_l1(x, d) if sparsify and rescale and p < 1.0 else x)
    stacked = torch.stack(pruned, dim=0)  # [n, *shape]
    wt = torch.tensor(w, dtype=stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
    stacked = stacked * wt
    if consensus is not None:
        mask = elect_sign(stacked, consensus).to(stacked.dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (wt * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = wt.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam
