"""Per-tensor weight-space operations.

Every function here is pure: it takes tensors (one tensor of each model, or one task vector
``delta = finetuned - base`` of each model) and returns a new tensor; nothing is modified in
place. Arithmetic is done in float32 (float64 inputs stay float64) and the result is returned
in that compute dtype; callers cast to the storage dtype.

The task-vector methods (:func:`task_arithmetic`, :func:`ties`, :func:`dare_linear`,
:func:`dare_ties`, :func:`lines`) return the *merged task vector*; the merged weight is
``base + result``. This is the convention of ``peft.utils.merge_utils``, which they are tested
against. Density always means the *fraction of entries kept* (peft's and mergekit's meaning);
DARE's drop probability is ``p = 1 - density``.

mergekit's generalized task arithmetic (its conventions differ from peft's for weighted TIES and for DARE's
rescaling), which merge recipes use by default, is :mod:`.task_vectors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch

Tensor = torch.Tensor
SignMethod = Literal["total", "frequency"]

__all__ = [
    "check_same_shape",
    "task_vector",
    "linear",
    "task_arithmetic",
    "magnitude_prune",
    "dare_prune",
    "elect_sign",
    "disjoint_mean",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "wise_ft",
    "model_stock",
    "layer_index",
    "lines_scale",
    "lines",
    "transfer",
]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _f(t: Tensor) -> Tensor:
    return t.to(_compute_dtype(t))


def check_same_shape(tensors: Sequence[Tensor], name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` unless all ``tensors`` have one shape."""
    if not tensors:
        raise ValueError(f"{name}: no tensors given")
    shape = tuple(tensors[0].shape)
    for i, t in enumerate(tensors[1:], start=1):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"shape mismatch for tensor {name!r}: input 0 has {shape}, input {i} has {tuple(t.shape)}"
            )


def _weights(n: int, weights: Sequence[float] | Tensor | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} tensors")
    return w


def _densities(n: int, density: float | Sequence[float]) -> list[float]:
    d = [float(density)] * n if isinstance(density, (int, float)) else [float(x) for x in density]
    if len(d) != n:
        raise ValueError(f"got {len(d)} densities for {n} tensors")
    for x in d:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"density must be in [0, 1] (fraction of entries kept), got {x}")
    return d


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    out = torch.zeros_like(_f(tensors[0]))
    for t, w in zip(tensors, weights):
        out.add_(_f(t), alpha=w)
    return out


def task_vector(finetuned: Tensor, base: Tensor) -> Tensor:
    """Task vector of Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089): ``tau = theta_ft - theta_base``."""
    check_same_shape([base, finetuned])
    return _f(finetuned) - _f(base)


def linear(
    tensors: Sequence[Tensor], weights: Sequence[float] | None = None, normalize: bool = True
) -> Tensor:
    """Linear / uniform model soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482).

    ``theta = sum_i w_i theta_i / sum_i w_i`` (``normalize=True``; uniform soup when ``weights``
    is None) or ``sum_i w_i theta_i`` (``normalize=False``).
    """
    check_same_shape(tensors)
    w = _weights(len(tensors), weights)
    if normalize:
        total = sum(w)
        if abs(total) < 1e-12:
            raise ValueError("linear merge: weights sum to zero, cannot normalize")
        w = [x / total for x in w]
    return _weighted_sum(tensors, w)


def task_arithmetic(
    deltas: Sequence[Tensor], weights: Sequence[float] | None = None, lam: float = 1.0
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089).

    ``theta = base + lam * sum_i w_i tau_i``; returns ``lam * sum_i w_i tau_i``.
    Equal to ``peft.utils.merge_utils.task_arithmetic`` (which has no ``lam``) times ``lam``.
    """
    check_same_shape(deltas)
    return _weighted_sum(deltas, _weights(len(deltas), weights)) * lam


def magnitude_prune(delta: Tensor, density: float, min_keep: int = 0) -> Tensor:
    """Keep the ``k = max(min_keep, int(density * numel))`` largest-magnitude entries, zero the rest (TIES "trim").

    Same as ``peft.utils.merge_utils.prune(..., method="magnitude")`` with ``min_keep=0``; mergekit keeps at least
    one entry (``min_keep=1``) and zeroes everything at ``density <= 0``. ``density >= 1`` returns the tensor
    unchanged; ties at the threshold are broken by ``torch.topk``.
    """
    (density,) = _densities(1, density)
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0 and min_keep:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    k = max(min_keep, int(density * flat.numel()))
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def dare_prune(
    delta: Tensor, density: float, generator: torch.Generator | None = None, rescale: bool = True
) -> Tensor:
    """DARE drop-and-rescale (Yu et al. 2024, https://arxiv.org/abs/2311.03099).

    ``m ~ Bernoulli(1 - p)`` per entry, ``tau' = m * tau / (1 - p)`` with ``p = 1 - density``.
    The mask is drawn as ``torch.bernoulli(full_like(delta, density), generator=generator)``,
    exactly as ``peft.utils.merge_utils.random_pruning`` draws it from the global generator, so
    a generator seeded with ``s`` reproduces peft after ``torch.manual_seed(s)`` (CPU).
    ``density >= 1`` returns the tensor unchanged without consuming random numbers (as peft);
    ``density == 0`` returns zeros.
    """
    (density,) = _densities(1, density)
    if density >= 1.0:
        return delta.clone()
    if density == 0.0:
        return torch.zeros_like(delta)
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * mask
    return out / density if rescale else out


def elect_sign(stacked: Tensor, method: SignMethod = "total") -> Tensor:
    """TIES sign election on task vectors stacked on dim 0; returns the agreement mask.

    ``gamma = sign(sum_i tau_i)`` ("total", the paper's mass rule) or ``sign(sum_i sign(tau_i))``
    ("frequency"); ties go to ``+1``. Mask is ``sign(tau_i) == gamma`` (zero entries never agree).
    """
    sign = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown sign method {method!r} (use 'total' or 'frequency')")
    majority = torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == majority


def disjoint_mean(stacked: Tensor, mask: Tensor) -> Tensor:
    """TIES disjoint merge: mean over the task vectors that agree with the elected sign.

    ``tau_m = sum_i mask_i tau_i / max(1, sum_i mask_i)``.
    """
    kept = (stacked * mask).sum(dim=0)
    return kept / torch.clamp(mask.sum(dim=0).to(stacked.dtype), min=1.0)


def _ties_core(pruned: list[Tensor], weights: list[float], sign_method: SignMethod, lam: float) -> Tensor:
    stacked = torch.stack(pruned, dim=0)
    mask = elect_sign(stacked, sign_method)
    w = torch.tensor(weights, dtype=stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
    return disjoint_mean(stacked * w, mask) * lam


def ties(
    deltas: Sequence[Tensor],
    density: float | Sequence[float],
    weights: Sequence[float] | None = None,
    sign_method: SignMethod = "total",
    lam: float = 1.0,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708).

    ``tau_m = lam * sum_i w_i [sign(t_i)=gamma] t_i / #{i: sign(t_i)=gamma}`` with
    ``t_i = trim_density(tau_i)`` and ``gamma = sign(sum_i t_i)``.

    Follows ``peft.utils.merge_utils.ties`` exactly: the sign is elected on the *unweighted*
    trimmed vectors, weights are applied afterwards and the disjoint mean divides by the number
    of agreeing models. (mergekit elects on the weighted vectors and divides by the sum of the
    agreeing weights; both agree when all weights are 1.) ``density`` may be per task vector.
    """
    check_same_shape(deltas)
    n = len(deltas)
    pruned = [magnitude_prune(_f(d), p) for d, p in zip(deltas, _densities(n, density))]
    return _ties_core(pruned, _weights(n, weights), sign_method, lam)


def dare_linear(
    deltas: Sequence[Tensor],
    density: float | Sequence[float],
    generator: torch.Generator | None = None,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
) -> Tensor:
    """DARE + task arithmetic (Yu et al. 2024, https://arxiv.org/abs/2311.03099).

    ``tau_m = lam * sum_i w_i m_i * tau_i / density_i``; masks are drawn in input order from
    ``generator`` (see :func:`dare_prune`); matches ``peft.utils.merge_utils.dare_linear``.
    """
    check_same_shape(deltas)
    n = len(deltas)
    pruned = [dare_prune(_f(d), p, generator) for d, p in zip(deltas, _densities(n, density))]
    return _weighted_sum(pruned, _weights(n, weights)) * lam


def dare_ties(
    deltas: Sequence[Tensor],
    density: float | Sequence[float],
    generator: torch.Generator | None = None,
    weights: Sequence[float] | None = None,
    sign_method: SignMethod = "total",
    lam: float = 1.0,
) -> Tensor:
    """DARE-TIES: DARE drop-and-rescale instead of TIES' magnitude trim, then sign election and
    disjoint mean (https://arxiv.org/abs/2311.03099, https://arxiv.org/abs/2306.01708).

    ``tau_m = lam * disjoint_mean(w_i * m_i * tau_i / density_i)``; matches
    ``peft.utils.merge_utils.dare_ties`` (same conventions as :func:`ties`).
    """
    check_same_shape(deltas)
    n = len(deltas)
    pruned = [dare_prune(_f(d), p, generator) for d, p in zip(deltas, _densities(n, density))]
    return _ties_core(pruned, _weights(n, weights), sign_method, lam)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985, https://doi.org/10.1145/325165.325242).

    ``theta = sin((1-t)W)/sin(W) v0 + sin(tW)/sin(W) v1`` with ``cos W = <v0/|v0|, v1/|v1|>``,
    the whole tensor flattened to one vector (as in mergekit's original SLERP). The unnormalised
    tensors are interpolated, so two tensors of equal norm stay on that sphere (plain linear
    interpolation shrinks them). Falls back to ``(1-t) v0 + t v1`` when ``|cos W| > dot_threshold``
    (near-parallel or antiparallel) or when either tensor has norm ``<= eps``.
    ``t = 0`` returns ``v0`` and ``t = 1`` returns ``v1`` exactly.
    """
    check_same_shape([v0, v1])
    a, b = _f(v0), _f(v1)
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    na, nb = a.norm(), b.norm()
    if na <= eps or nb <= eps:
        return (1 - t) * a + t * b
    dot = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


def wise_ft(base: Tensor, finetuned: Tensor, alpha: float) -> Tensor:
    """WiSE-FT weight-space ensembling (Wortsman et al. 2022, https://arxiv.org/abs/2109.01903).

    ``theta = (1 - alpha) theta_base + alpha theta_ft``; see ``soup.wise_ft_sweep`` to choose alpha.
    """
    check_same_shape([base, finetuned])
    return (1 - alpha) * _f(base) + alpha * _f(finetuned)


def model_stock(base: Tensor, finetuned: Sequence[Tensor], eps: float = 1e-6, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522), applied per tensor (layer-wise).

    ``theta = t * mean_i theta_i + (1 - t) theta_base`` with ``t = N cos / (1 + (N - 1) cos)``
    and ``cos`` the mean pairwise cosine between the flattened deltas ``theta_i - theta_base``.
    Needs ``N >= 2``. Where ``1 + (N - 1) cos`` is ~0 the base tensor is kept (as mergekit).
    The paper computes t per weight tensor ("layer-wise"), as mergekit's default; ``filter_wise`` is
    mergekit's option of one t per output row (each row of a matrix, a 1-d tensor as one row).
    """
    if len(finetuned) < 2:
        raise ValueError("model_stock needs at least two fine-tuned tensors")
    check_same_shape([base, *finetuned])
    b = _f(base)
    rows = b.reshape(1, -1) if not filter_wise or b.dim() < 2 else b.reshape(b.shape[0], -1)  # [R, C]
    deltas = [(_f(w).reshape(rows.shape) - rows) for w in finetuned]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            denom = (deltas[i].norm(dim=-1) * deltas[j].norm(dim=-1)).clamp(min=eps)  # [R]
            cosines.append(((deltas[i] * deltas[j]).sum(-1) / denom).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(0)  # [R]
    n = len(finetuned)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < eps
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos),
                                                                             denominator))[:, None]  # [R, 1]
    avg = _weighted_sum(finetuned, [1.0 / n] * n).reshape(rows.shape)
    return (t * avg + (1 - t) * rows).reshape(b.shape)


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str, pattern: str | re.Pattern[str] = _LAYER_RE) -> int | None:
    """Decoder-layer index parsed from a tensor name (``model.layers.{i}.`` by default), else None."""
    m = re.search(pattern, name)
    return int(m.group(1)) if m else None


def lines_scale(
    name: str,
    num_layers: int,
    alpha: float = 0.0,
    beta: float | None = None,
    non_layer_scale: float | None = None,
    pattern: str | re.Pattern[str] = _LAYER_RE,
) -> float:
    """LiNeS coefficient of a tensor (Wang et al. 2025, https://arxiv.org/abs/2410.17146).

    ``lambda(l) = alpha + beta * l / (L - 1)`` for layer ``l`` in ``0..L-1``; ``beta`` defaults to
    ``1 - alpha`` so the deepest layer keeps its full delta and the shallowest keeps ``alpha``.
    Tensors outside the layer stack (embeddings, final norm, LM head) get ``alpha``, as the authors'
    ``LiNeS_scaling`` ("scale with alpha for layers outside residual blocks",
    github.com/wang-kee/LiNeS, src/eval/eval.py), unless ``non_layer_scale`` is given.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    beta = 1.0 - alpha if beta is None else beta
    idx = layer_index(name, pattern)
    if idx is None:
        return float(non_layer_scale) if non_layer_scale is not None else alpha
    if idx >= num_layers:
        raise ValueError(f"tensor {name!r} has layer index {idx} but num_layers={num_layers}")
    return alpha + beta * (idx / (num_layers - 1) if num_layers > 1 else 1.0)


def lines(
    delta: Tensor,
    name: str,
    num_layers: int,
    alpha: float = 0.0,
    beta: float | None = None,
    non_layer_scale: float | None = None,
) -> Tensor:
    """LiNeS layer-increasing scaling of a (merged) task vector: ``tau'(l) = lambda(l) tau(l)``.

    See :func:`lines_scale` for ``lambda`` and the rule for non-layer tensors.
    """
    return _f(delta) * lines_scale(name, num_layers, alpha, beta, non_layer_scale)


def transfer(base_old: Tensor, finetuned: Tensor, base_new: Tensor, weight: float = 1.0) -> Tensor:
    """Fine-tuning transfer (Lin et al. 2025, https://arxiv.org/abs/2503.20110).

    ``theta = theta_base_new + w (theta_ft - theta_base_old)``; all three share one architecture.
    """
    check_same_shape([base_old, finetuned, base_new])
    return _f(base_new) + weight * (_f(finetuned) - _f(base_old))

