"""LoRA-level merging of several adapters (the result is again an adapter).

All functions take per-adapter factors ``A_i`` (r_i x in) and ``B_i`` (out x r_i), weights
``w_i`` and the adapters' scalings ``s_i`` (``lora_alpha / r``), and return ``(A, B)`` whose
adapter is meant to be used with **scaling 1** (write ``lora_alpha = r``), so its delta is
``B @ A``. Conventions follow ``peft.LoraModel.add_weighted_adapter``:

* :func:`lora_linear` - weighted linear on the factors:
  ``A = sum_i sign(c_i) sqrt|c_i| A_i``, ``B = sum_i sqrt|c_i| B_i`` with ``c_i = w_i s_i``.
  **This is not the same as merging deltas**: ``B @ A = sum_i sum_j (...) B_i A_j`` contains
  the cross terms ``B_i A_j`` (i != j); only the diagonal terms equal ``sum_i w_i s_i B_i A_i``.
  It needs equal ranks and is cheap but approximate.
* :func:`lora_cat` - concatenation along the rank: ``A = [c_1 A_1; ...; c_n A_n]``,
  ``B = [B_1 ... B_n]``; exact: ``B @ A = sum_i w_i s_i B_i A_i``; rank ``sum_i r_i``.
* :func:`lora_svd` - SVD re-factorisation of ``M = sum_i w_i s_i B_i A_i`` to rank ``r``:
  ``B = U_r diag(S_r)``, ``A = Vh_r``; the best rank-r approximation of the exact sum.

:func:`merge_lora_adapters` applies them to adapter directories; :func:`run_lora_recipe` is
``merge_method: lora_linear | lora_cat | lora_svd`` of a merge recipe.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from tunelab.core.io import atomic_dir
from tunelab.weights import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COPY_PATTERNS,
    AdapterReader,
    CheckpointReader,
    copy_model_files,
    is_adapter_dir,
    lora_scaling,
    resolve_model_path,
)

from .recipe import Recipe

Tensor = torch.Tensor
LoraMethod = Literal["linear", "cat", "svd"]

__all__ = ["lora_scaling", "lora_delta", "lora_linear", "lora_cat", "lora_svd", "merge_lora_adapters",
           "run_lora_recipe"]


def lora_delta(A: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """The weight delta of one LoRA module (Hu et al. 2021, https://arxiv.org/abs/2106.09685):
    ``delta W = scaling * B @ A``."""
    return (B.float() @ A.float()) * scaling


def _coeffs(n: int, weights: Sequence[float] | None, scalings: Sequence[float] | None) -> list[float]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    s = [1.0] * n if scalings is None else [float(x) for x in scalings]
    if len(w) != n or len(s) != n:
        raise ValueError(f"got {len(w)} weights and {len(s)} scalings for {n} adapters")
    return [a * b for a, b in zip(w, s)]


def _check(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> None:
    if not As or len(As) != len(Bs):
        raise ValueError(f"need as many A as B factors (got {len(As)} and {len(Bs)})")
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} are not LoRA factors")
        if a.shape[1] != As[0].shape[1] or b.shape[0] != Bs[0].shape[0]:
            raise ValueError(f"adapter {i}: delta shape {(b.shape[0], a.shape[1])} differs from adapter 0")


def lora_linear(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | None = None,
    scalings: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """Weighted linear combination of the factors (peft ``combination_type="linear"``); see module doc."""
    _check(As, Bs)
    if len({a.shape[0] for a in As}) != 1:
        raise ValueError(f"lora_linear needs equal ranks, got {[a.shape[0] for a in As]}")
    c = _coeffs(len(As), weights, scalings)
    A = sum(math.copysign(math.sqrt(abs(ci)), ci) * a.float() for ci, a in zip(c, As))
    B = sum(math.sqrt(abs(ci)) * b.float() for ci, b in zip(c, Bs))
    return A, B


def lora_cat(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | None = None,
    scalings: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """Concatenation along the rank (peft ``combination_type="cat"``); exact, rank ``sum r_i``."""
    _check(As, Bs)
    c = _coeffs(len(As), weights, scalings)
    return torch.cat([ci * a.float() for ci, a in zip(c, As)], dim=0), torch.cat([b.float() for b in Bs], dim=1)


def lora_svd(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    rank: int,
    weights: Sequence[float] | None = None,
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` SVD of ``sum_i w_i s_i B_i A_i`` (peft ``combination_type="svd"``)."""
    _check(As, Bs)
    c = _coeffs(len(As), weights, scalings)
    m = sum(ci * lora_delta(a, b) for ci, a, b in zip(c, As, Bs))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    return vh[:r], u[:, :r] * s[:r]


def _pad_rank(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    extra = r - A.shape[0]
    if extra > 0:  # zero rows/columns add nothing to B @ A
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
    return A, B


def merge_lora_adapters(
    adapter_dirs: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    method: LoraMethod = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Merge PEFT LoRA adapters into one new adapter directory (written atomically).

    Modules adapted by only some adapters are merged from those. The new rank is the common
    rank (``linear``), the sum of ranks (``cat``) or ``rank`` (``svd``, default max rank);
    modules needing less are zero-padded. The config is the first adapter's with ``r`` and
    ``lora_alpha`` set to the new rank (scaling 1), rsLoRA off, patterns cleared and
    ``target_modules`` the union. Factors are stored in ``dtype`` (default: the first
    adapter's). Embedding LoRA and ``fan_in_fan_out`` adapters are not supported here.
    ``base_model`` (if given) replaces ``base_model_name_or_path``; tokenizer files of the first
    adapter are copied along, and ``extra_files`` (name -> text) written beside.
    """
    readers = [AdapterReader(p) for p in adapter_dirs]
    n = len(readers)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} adapters")
    for r in readers:
        if r.full_keys:
            raise ValueError(f"{r.path}: adapters with modules_to_save cannot be merged at LoRA level")
        if any(m.embedding or m.fan_in_fan_out for m in r.modules.values()):
            raise ValueError(f"{r.path}: embedding / fan_in_fan_out LoRA is not supported by merge_lora_adapters")
    targets = list(dict.fromkeys(t for r in readers for t in r.modules))
    ranks = [r.raw(m.a_key).shape[0] for r in readers for m in r.modules.values()]
    if method == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"linear LoRA merging needs one rank across adapters, got {sorted(set(ranks))}")
        new_rank = ranks[0]
    elif method == "cat":
        new_rank = sum(max(r.raw(m.a_key).shape[0] for m in r.modules.values()) for r in readers)
    elif method == "svd":
        new_rank = rank or max(ranks)
    else:
        raise ValueError(f"unknown LoRA merge method {method!r} (use linear, cat or svd)")

    first_key = next(iter(readers[0].modules.values())).a_key
    store = dtype or readers[0].raw(first_key).dtype
    tensors: dict[str, Tensor] = {}
    for target in targets:
        users = [(r, wi) for r, wi in zip(readers, w) if target in r.modules]
        As = [r.raw(r.modules[target].a_key) for r, _ in users]
        Bs = [r.raw(r.modules[target].b_key) for r, _ in users]
        ws = [wi for _, wi in users]
        ss = [r.modules[target].scaling for r, _ in users]
        try:
            if method == "linear":
                A, B = lora_linear(As, Bs, ws, ss)
            elif method == "cat":
                A, B = lora_cat(As, Bs, ws, ss)
            else:
                A, B = lora_svd(As, Bs, new_rank, ws, ss)
        except ValueError as err:
            raise ValueError(f"tensor {target!r}: {err}") from None
        A, B = _pad_rank(A, B, new_rank)
        m = users[0][0].modules[target]
        tensors[m.a_key] = A.to(store).contiguous()
        tensors[m.b_key] = B.to(store).contiguous()

    config = dict(readers[0].config)
    tms = [r.config.get("target_modules") for r in readers]
    if all(isinstance(t, list) for t in tms):
        config["target_modules"] = sorted({x for t in tms for x in t})
    elif all(isinstance(t, str) for t in tms) and len(set(tms)) > 1:
        config["target_modules"] = "|".join(f"({t})" for t in tms)
    config.update(r=new_rank, lora_alpha=new_rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    with atomic_dir(output_dir, exists="replace" if overwrite else "error") as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copy_model_files(readers[0].path, tmp, [p for p in COPY_PATTERNS if p != "config.json"])
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
    return Path(output_dir)


def run_lora_recipe(recipe: Recipe, output_dir: str | os.PathLike[str], *, overwrite: bool = False) -> dict:
    """``merge_method: lora_linear | lora_cat | lora_svd`` of a (resolved) merge Recipe: every model
    must be a PEFT LoRA adapter; with ``base_model`` every adapted tensor is checked against the
    base (names and shapes, the error names the tensor) and the output adapter points at it.
    Weights are the per-model ``weight``s; ``rank`` applies to ``lora_svd``. Returns a report."""
    paths = [resolve_model_path(e.model) for e in recipe.models]
    for p in paths:
        if not is_adapter_dir(p):
            raise ValueError(f"{recipe.merge_method} merges PEFT LoRA adapters; {p} is not one (no {ADAPTER_CONFIG})")
    base = resolve_model_path(recipe.base_model) if recipe.base_model else None
    if base is not None:
        with CheckpointReader(base) as ref:
            for p in paths:
                with AdapterReader(p) as ad:
                    for n in ad.names():
                        if n not in ref:
                            raise ValueError(f"adapter {p} targets tensor {n!r}, which is not in {base}")
                        if ad.delta_shape(n) != ref.shape(n):
                            raise ValueError(f"shape mismatch for tensor {n!r}: adapter {p} gives "
                                             f"{ad.delta_shape(n)}, base {base} has {ref.shape(n)}")
    method = recipe.merge_method.removeprefix("lora_")
    out = merge_lora_adapters(paths, output_dir, method, recipe.weights(), rank=recipe.param("rank", None),
                              dtype=recipe.torch_dtype, overwrite=overwrite,
                              base_model=str(base) if base is not None else None,
                              extra_files={"tunelab_merge.yaml": recipe.to_yaml()})
    config = json.loads((Path(out) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return {"merge_method": recipe.merge_method, "output": "adapter", "rank": config["r"],
            "base_model_name_or_path": config.get("base_model_name_or_path")}
