"""Held-out preference metrics: what the training log shows per step, measured on evaluation pairs.

`evaluate_preferences` runs an objective (DPO, SimPO, ...) over held-out encoded pairs without gradient
and returns its metrics averaged over pairs (`rewards/accuracies` = reward accuracy, margins, chosen and
rejected rewards and log-probs) and the mean loss, plus `preference_accuracy`: the fraction of pairs whose
chosen response the policy itself finds more likely (summed log-prob, ties count as wrong); for a reward model
(`objective: reward`) the fraction it scores higher (its pairwise accuracy, = `rewards/accuracies`). Reward
accuracy is 0 before training by construction (the policy is its own reference, every reward is 0);
preference accuracy is meaningful before and after, so a before/after table uses both.
"""

from __future__ import annotations

import torch

from tunelab.objectives.base import Objective
from tunelab.objectives.references import pair_logps


@torch.no_grad()
def evaluate_preferences(model, objective: Objective, pairs: list[dict], *, batch_size: int = 16, pad_id: int = 0,
                         device: torch.device | str | None = None, precision: str = "fp32", ref=None,
                         collate=None) -> dict[str, float]:
    """Mean loss and metrics per pair over `pairs` (encoded preference examples), in eval mode."""
    from tunelab.core.precision import autocast_context
    from tunelab.data.batching import collate_preference

    if objective.batch_kind != "preference":
        raise ValueError(f"objective {objective.name!r} does not train on preference pairs")
    collate = collate or collate_preference
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    units = loss = preferred = 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(pairs[start: start + batch_size], pad_id).items()}
            with autocast_context(device, precision):
                out = objective.compute(model, batch, ref)
                if objective.head == "causal_lm":
                    pol_c, pol_r, _, _ = pair_logps(model, batch)  # [B] summed response log-probs
                    preferred += float((pol_c > pol_r).sum())
                else:  # a reward model prefers the response it scores higher: its pairwise accuracy
                    preferred += float(out.metrics["rewards/accuracies"])
            loss += float(out.loss_sum)
            units += float(out.n_units)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    n = max(units, 1.0)
    result = {"pref_eval_loss": loss / n, "preference_accuracy": preferred / max(len(pairs), 1), "pairs": len(pairs)}
    result.update({k: v / n for k, v in sums.items()})
    return result


__all__ = ["evaluate_preferences"]
