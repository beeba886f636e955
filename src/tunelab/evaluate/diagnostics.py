"""Weight diagnostics of a fine-tune: how much, in how many directions, and in which NEW directions.

Per weight matrix W0 (base) -> W (fine-tuned), delta D = W - W0:
  delta_norm      ||D||_F, and rel_delta = ||D||_F / ||W0||_F
  effective_rank  of D: exp(H(p)), p_i = s_i / sum_j s_j over D's singular values s (Roy & Vetterli 2007,
                  "The effective rank: a measure of effective dimensionality"); r equal singular values give r.
  intruders       "intruder dimensions" (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
                  Equivalence", https://arxiv.org/abs/2410.21228): among the top `k` left singular vectors u_j of
                  W, those whose largest |cosine similarity| with the left singular vectors of W0 is below
                  `threshold`: directions W ranks highly that W0 did not have. The paper compares with ALL of
                  W0's singular vectors (base_k=None, the default); base_k=m compares with W0's top m only.
Defaults k=10, threshold=0.5: the paper's top-10 analysis with a mid-range epsilon of its sweep; full
fine-tuning typically shows ~0 intruders, low-rank LoRA several.

Inputs: two state dicts, or a run directory (base + its export/adapter deltas, else its export/merged model,
against the base model of its recipe). Only 2-D weights of the transformer blocks are analysed by default
(`include` regex), embeddings and lm_head excluded (large, and tied).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

DEFAULT_INCLUDE = r"layers\.\d+\..*\.weight$"
_LAYER = re.compile(r"layers\.(\d+)\.")


def effective_rank(singular_values: torch.Tensor, eps: float = 1e-12) -> float:
    s = singular_values.double().clamp_min(0)
    total = float(s.sum())
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, *, k: int = 10, threshold: float = 0.5,
                        base_k: int | None = None) -> dict[str, Any]:
    """Top-k left singular vectors of `tuned` [out, in] whose max |cos| with `base`'s are < threshold."""
    u0, _, _ = torch.linalg.svd(base.double(), full_matrices=False)  # [out, r0]
    u1, s1, _ = torch.linalg.svd(tuned.double(), full_matrices=False)  # [out, r1]
    if base_k is not None:
        u0 = u0[:, :base_k]
    k = min(k, u1.shape[1])
    sims = (u1[:, :k].T @ u0).abs()  # [k, r0]: columns are unit vectors, so these are cosines
    max_cos = sims.max(dim=1).values  # [k]
    idx = [j for j in range(k) if float(max_cos[j]) < threshold]
    return {"count": len(idx), "indices": idx, "max_cos": [round(float(c), 4) for c in max_cos],
            "singular_values": [float(s1[j]) for j in idx]}


def matrix_diagnostics(base: torch.Tensor, tuned: torch.Tensor, *, k: int = 10, threshold: float = 0.5,
                       base_k: int | None = None) -> dict[str, Any]:
    base, tuned = base.double(), tuned.double()
    delta = tuned - base  # [out, in]
    d_norm, b_norm = float(delta.norm()), float(base.norm())
    out: dict[str, Any] = {"shape": list(base.shape), "delta_norm": d_norm,
                           "rel_delta": d_norm / b_norm if b_norm > 0 else math.inf}
    if d_norm == 0.0:
        out.update(effective_rank=0.0, intruders=0, intruder_max_cos=[])
        return out
    out["effective_rank"] = effective_rank(torch.linalg.svdvals(delta))
    intr = intruder_dimensions(base, tuned, k=k, threshold=threshold, base_k=base_k)
    out.update(intruders=intr["count"], intruder_max_cos=intr["max_cos"])
    return out


def _split_name(name: str) -> tuple[int | None, str]:
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    module = name[m.end():] if m else name
    return layer, module.removesuffix(".weight")


def diagnose(names: Iterable[str], get_base: Callable[[str], torch.Tensor],
             get_tuned: Callable[[str], torch.Tensor], *, k: int = 10, threshold: float = 0.5,
             base_k: int | None = None, include: str = DEFAULT_INCLUDE, progress: bool = False) -> dict[str, Any]:
    """Per-matrix diagnostics of every included 2-D tensor, and a per-run summary."""
    from tqdm.auto import tqdm

    pattern = re.compile(include)
    rows = []
    for name in tqdm([n for n in names if pattern.search(n)], desc="diagnostics", disable=not progress, leave=False):
        base, tuned = get_base(name), get_tuned(name)
        if base.ndim != 2:
            continue
        if base.shape != tuned.shape:
            raise ValueError(f"tensor {name}: base shape {tuple(base.shape)} != fine-tuned {tuple(tuned.shape)}")
        layer, module = _split_name(name)
        rows.append({"name": name, "layer": layer, "module": module,
                     **matrix_diagnostics(base, tuned, k=k, threshold=threshold, base_k=base_k)})
    changed = [r for r in rows if r["delta_norm"] > 0]
    summary = {
        "matrices": len(rows), "changed": len(changed),
        "total_delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in rows)),
        "mean_rel_delta": sum(r["rel_delta"] for r in changed) / len(changed) if changed else 0.0,
        "mean_effective_rank": sum(r["effective_rank"] for r in changed) / len(changed) if changed else 0.0,
        "intruders_total": sum(r["intruders"] for r in rows),
        "intruders_per_matrix": sum(r["intruders"] for r in rows) / len(rows) if rows else 0.0,
        "k": k, "threshold": threshold, "base_k": base_k,
    }
    return {"summary": summary, "matrices": rows}


def diagnose_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], **kw) -> dict[str, Any]:
    names = [n for n in base if n in tuned]
    return diagnose(names, base.__getitem__, tuned.__getitem__, **kw)


def diagnose_run(run_dir: str | Path, *, write: bool = True, **kw) -> dict[str, Any]:
    """Diagnostics of a run's fine-tuned weights against its base model; saved as <run>/diagnostics.json."""
    from tunelab.core.rundir import write_json
    from tunelab.model import resolve_model_path
    from tunelab.recipe import load_recipe
    from tunelab.weights import AdapterReader, CheckpointReader

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    base = CheckpointReader(resolve_model_path(recipe.model)[0])
    merged, adapter = run_dir / "export" / "merged", run_dir / "export" / "adapter"
    # The adapter first: its delta is exact, while a merged export also carries whatever rounding the frozen
    # base weights went through in training (e.g. bf16 storage), a full-rank noise that would swamp the delta.
    if (adapter / "adapter_config.json").is_file():
        reader = AdapterReader(adapter)
        changed = set(reader.names())
        result = diagnose([n for n in base.names() if n in changed], base.get,
                          lambda n: base.get(n).float() + reader.delta(n, base.get(n)), **kw)
        source = str(adapter)
    elif (merged / "config.json").is_file():
        tuned = CheckpointReader(merged)
        names = [n for n in base.names() if n in tuned]
        result = diagnose(names, base.get, tuned.get, **kw)
        source = str(merged)
    else:
        raise FileNotFoundError(f"{run_dir}: no export/merged or export/adapter to diagnose (run `tunelab export`)")
    result["summary"].update(base=str(recipe.model.name_or_path), tuned=source)
    if write:
        write_json(run_dir, "diagnostics.json", result)
    return result
