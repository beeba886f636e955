"""Reference log-probs computed once, before training, and cached in the run directory.

A reference-based preference loss (DPO and its loss types) needs, for every pair, the summed
log-probability of the chosen and of the rejected response under the frozen reference model. Three
ways to get it, cheapest in memory first:

1. an adapter method (LoRA, ...): the policy's own base with the adapter disabled
   (`AdapterDisabledReference`, the objectives' default) - no second copy, one extra no-grad forward
   per step;
2. any other method (full, freeze, ...): THIS module - one no-grad pass over the training pairs with
   the initial model, before `method.prepare`, saved as `reference_logps-<hash>.safetensors` in the
   run directory (tensors `ref_chosen_logps` [N], `ref_rejected_logps` [N] fp32, in the order of the
   encoded pairs; header: the full data hash, N, precision, model key). The collator then puts the two
   values of each example into the batch (`ref_chosen_logps` / `ref_rejected_logps` [B]), and `DPO`
   uses them instead of running a reference. A resumed run finds the file and skips the pass;
3. `FrozenCopyReference` (a second model in memory) where a live reference is needed (KTO's
   mismatched pairs, distillation).

The hash covers every token id and label of every pair plus a caller-given key (model name and
precision), so a changed dataset, tokenizer, truncation or model never reuses a stale file.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Any

import torch

from tunelab.core.io import atomic_file
from tunelab.objectives.references import concatenate_pair, eval_mode, model_sequence_logps

KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_PAIR_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
#: objectives that read precomputed reference log-probs from the batch
CACHEABLE_OBJECTIVES = ("dpo", "spin")


def pairs_fingerprint(encoded_pairs: list[dict], key: str = "") -> str:
    """sha256 over `key` and every token id and label of every encoded pair, in order (hex, 64 chars)."""
    h = hashlib.sha256(key.encode("utf-8"))
    h.update(len(encoded_pairs).to_bytes(8, "little"))
    for e in encoded_pairs:
        for f in _PAIR_FIELDS:
            seq = e[f]
            h.update(len(seq).to_bytes(4, "little"))
            h.update(array("q", seq).tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"reference_logps-{fingerprint[:16]}.safetensors"


def needs_reference_logps(objective, method) -> bool:
    """True when the objective reads cached reference log-probs and the method has no adapter to disable."""
    return objective.name in CACHEABLE_OBJECTIVES and not method.capabilities.is_adapter


def save_reference_logps(path: Path, logps: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (temporary file + rename), so an interrupted run never leaves a half file."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: logps[k].detach().float().cpu().contiguous() for k in KEYS}, str(tmp), metadata=metadata)


def load_reference_logps(path: str | Path, fingerprint: str | None = None, n: int | None = None):
    """The cached tensors, or None when the file is missing or was made for other data (hash or N differ)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            return None
        out = {k: f.get_tensor(k) for k in KEYS}
    if n is not None and any(v.numel() != n for v in out.values()):
        return None
    return out


def _pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    from tunelab.data.batching import collate_preference

    return collate_preference(examples, pad_id)


@torch.no_grad()
def precompute_reference_logps(
    model: Any,
    encoded_pairs: list[dict],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    model_key: str = "",
) -> dict[str, torch.Tensor]:
    """Summed response log-probs of every pair under the reference.

    Returns {"ref_chosen_logps": [N], "ref_rejected_logps": [N]} (fp32, CPU, in the order of the pairs).

    `model` is the reference itself (the initial model, before the method touches it) or a
    `Reference` (anything with `.logps(batch)`, e.g. `AdapterDisabledReference`). Runs without gradient,
    in eval mode, under the same autocast as training (`precision`), chosen and rejected of a pair in
    one concatenated forward exactly as the objectives do. With `cache_dir`, a matching cache file is
    loaded instead, and a new one is written after computing.
    """
    from tunelab.core.precision import autocast_context, resolve_precision

    is_reference = hasattr(model, "logps") and not isinstance(model, torch.nn.Module)
    module = model.model if is_reference else model
    if device is None:
        device = next(module.parameters()).device
    device = torch.device(device)
    # the key holds the precision computed in, never `auto` (which means different things on different machines)
    precision = resolve_precision(precision, device)
    fingerprint = pairs_fingerprint(encoded_pairs, f"{model_key}|{precision}")
    path = cache_path(cache_dir, fingerprint) if cache_dir is not None else None
    if path is not None and (cached := load_reference_logps(path, fingerprint, len(encoded_pairs))) is not None:
        return cached
    chosen, rejected = [], []
    with eval_mode(module):
        for start in range(0, len(encoded_pairs), batch_size):
            batch = {k: v.to(device) for k, v in _pad_batch(encoded_pairs[start: start + batch_size], pad_id).items()}
            with autocast_context(device, precision):
                if is_reference:
                    c, r = model.logps(batch)
                else:
                    ids, att, lab = concatenate_pair(batch)
                    logps, _ = model_sequence_logps(module, ids, att, lab)  # [2B]
                    b = batch["chosen_input_ids"].size(0)
                    c, r = logps[:b], logps[b:]
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    out = {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}
    if path is not None:
        save_reference_logps(path, out, {"fingerprint": fingerprint, "n": str(len(encoded_pairs)),
                                         "precision": precision, "model": model_key})
    return out


def attach_reference_logps(encoded_pairs: list[dict], logps: dict[str, torch.Tensor]) -> list[dict]:
    """Store each pair's two reference values in its encoded dict (floats), where the collator finds them."""
    n = len(encoded_pairs)
    if any(logps[k].numel() != n for k in KEYS):
        raise ValueError(f"{n} pairs but {logps[KEYS[0]].numel()} cached reference values")
    for i, e in enumerate(encoded_pairs):
        for k in KEYS:
            e[k] = float(logps[k][i])
    return encoded_pairs


def collate_preference_with_reference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_preference` plus `ref_chosen_logps` / `ref_rejected_logps` [B] fp32 when the examples carry them.

    `tunelab.data.batching.collate_preference` (the training and evaluation collator) does this itself; the
    name is kept for callers that want to say so. Examples that mix cached and uncached pairs are an error
    (a half-cached batch would silently fall back to a live reference for all of it).
    """
    return _pad_batch(examples, pad_id)


__all__ = [
    "KEYS",
    "CACHEABLE_OBJECTIVES",
    "pairs_fingerprint",
    "cache_path",
    "needs_reference_logps",
    "precompute_reference_logps",
    "load_reference_logps",
    "save_reference_logps",
    "attach_reference_logps",
    "collate_preference_with_reference",
]
