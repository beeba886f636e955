"""State-dict level merging: applying per-tensor ops over whole models, and the two procedures
that need a held-out score (greedy soup and the WiSE-FT alpha sweep).

Scores come from a ``score_fn(state_dict) -> float`` callable (higher is better), so no
evaluation code lives in ``merging/``. These procedures hold whole state dicts in memory
(running sum + candidate + trial soup, about three models); the streaming path in
:mod:`tunelab.merging.run` is used for everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import ops

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
ScoreFn = Callable[[Mapping[str, Tensor]], float]
Candidate = Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]]

__all__ = ["check_state_dicts", "map_state_dicts", "uniform_soup", "greedy_soup", "wise_ft_sweep", "GreedySoupResult",
           "SweepResult"]


def check_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    """``ValueError`` naming the first tensor whose presence or shape differs between state dicts."""
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        for name in ref:
            if name not in sd:
                raise ValueError(f"tensor {name!r} is missing from state dict {i}")
            if tuple(sd[name].shape) != tuple(ref[name].shape):
                raise ValueError(
                    f"shape mismatch for tensor {name!r}: {tuple(ref[name].shape)} vs {tuple(sd[name].shape)} "
                    f"(state dict {i})"
                )
        for name in sd:
            if name not in ref:
                raise ValueError(f"tensor {name!r} of state dict {i} is missing from state dict 0")


def map_state_dicts(fn: Callable[..., Tensor], *state_dicts: Mapping[str, Tensor]) -> StateDict:
    """``{name: fn(name, sd_0[name], sd_1[name], ...)}`` after checking names and shapes.

    Non-floating tensors are copied from the first state dict.
    """
    check_state_dicts(state_dicts)
    out = {}
    for name, t0 in state_dicts[0].items():
        if not t0.is_floating_point():
            out[name] = t0.clone()
        else:
            out[name] = fn(name, *(sd[name] for sd in state_dicts))
    return out


def uniform_soup(state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Uniform (or weighted, normalised) soup of whole state dicts; see :func:`ops.linear`."""
    return map_state_dicts(lambda _n, *ts: ops.linear(ts, weights), *state_dicts)


def _load(c: Candidate) -> Mapping[str, Tensor]:
    return c() if callable(c) else c


@dataclass
class GreedySoupResult:
    state_dict: StateDict
    selected: list[int]  # indices into the candidate list, in the order they were added
    individual_scores: list[float]
    soup_score: float
    history: list[tuple[int, float, bool]] = field(default_factory=list)  # (candidate, trial score, accepted)


def greedy_soup(candidates: Sequence[Candidate], score_fn: ScoreFn) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1).

    Sort ingredients by their own held-out score (descending); starting from the best, add the
    next one iff ``score(mean(soup + {theta_i})) > score(mean(soup))`` (strict improvement; the
    paper's pseudo-code uses ``>=``). ``candidates`` are state dicts or zero-argument loaders
    (called once for the individual score and again when tried, so at most one is held at a time
    besides the soup). The soup is a float32 running sum divided by its size.
    """
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    scores = []
    ref: Mapping[str, Tensor] | None = None
    for c in candidates:
        sd = _load(c)
        if ref is None:
            ref = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
        else:
            check_state_dicts([ref, sd])
        scores.append(float(score_fn(sd)))
        del sd
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    first = _load(candidates[order[0]])
    total = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in first.items()}
    dtypes = {k: v.dtype for k, v in first.items()}
    del first

    def average(s: Mapping[str, Tensor], n: int) -> StateDict:
        return {k: (v / n).to(dtypes[k]) if v.is_floating_point() else v for k, v in s.items()}

    selected, best, history = [order[0]], scores[order[0]], []
    for i in order[1:]:
        cand = _load(candidates[i])
        trial_sum = {k: v + cand[k].float() if v.is_floating_point() else v for k, v in total.items()}
        del cand
        trial_score = float(score_fn(average(trial_sum, len(selected) + 1)))
        accepted = trial_score > best
        history.append((i, trial_score, accepted))
        if accepted:
            total, best = trial_sum, trial_score
            selected.append(i)
        del trial_sum
    return GreedySoupResult(average(total, len(selected)), selected, scores, best, history)


@dataclass
class SweepResult:
    alpha: float
    state_dict: StateDict
    scores: dict[float, float]


def wise_ft_sweep(
    base: Mapping[str, Tensor],
    finetuned: Mapping[str, Tensor],
    alphas: Sequence[float],
    score_fn: ScoreFn,
) -> SweepResult:
    """WiSE-FT (https://arxiv.org/abs/2109.01903): score ``(1-a) base + a ft`` for each ``a`` in
    ``alphas`` and keep the best (first one on ties). Output tensors keep the base's dtypes."""
    if not alphas:
        raise ValueError("wise_ft_sweep needs at least one alpha")
    check_state_dicts([base, finetuned])
    best: SweepResult | None = None
    scores: dict[float, float] = {}
    for a in alphas:
        sd = map_state_dicts(lambda _n, b, f: ops.wise_ft(b, f, a).to(b.dtype), base, finetuned)
        s = float(score_fn(sd))
        scores[float(a)] = s
        if best is None or s > scores[best.alpha]:
            best = SweepResult(float(a), sd, scores)
        del sd
    assert best is not None
    best.scores = scores
    return best
