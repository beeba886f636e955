"""Held-out evaluation on a recipe's eval data: what a run saves as eval_<label>.json (`runner.evaluate`) and what
`tunelab eval TARGET` without `--tasks` reports. One implementation for both.

* SFT data: `eval_loss`, the plain cross-entropy per response token of the held-out examples, whatever the
  training objective (a DFT, weighted or distillation loss is no perplexity): mean over target tokens t of
  -log p(y_t | y_<t, x); `perplexity` = exp(eval_loss);
* preference pairs under a preference objective (a run's own, with its reference): `evaluate_preferences`
  (`reward_accuracy` = the objective's `rewards/accuracies`, `preference_accuracy` = P(chosen) > P(rejected)
  under the policy, margins, rewards, `logps/chosen`, `logps/rejected`, `pref_eval_loss`);
* preference pairs without one (a plain model, or an SFT run): what needs no reference, `preference_accuracy`
  and the summed response log-probs;
* built-in tasks (a preference task too: its base task's checker): `exact_match` of greedy generations;
* a reward model (`objective: reward`, a scalar head): its pairwise metrics on pairs, with or without the run's
  objective; no exact match (it generates nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.pipeline import EvalItem
from tunelab.model import model_head

REFERENCE_FREE = ("preference_accuracy", "logps/chosen", "logps/rejected", "pairs")


@dataclass
class HeldOutSettings:
    batch_size: int
    precision: str  # autocast dtype name: bf16 | fp16 | fp32 (auto is resolved per device by autocast_context)
    max_new_tokens: int  # generation budget of exact match
    device: torch.device
    progress: bool = True


def is_pairs(data: list[dict] | None) -> bool:
    """Encoded preference pairs (chosen/rejected), as opposed to SFT examples."""
    return bool(data) and "chosen_input_ids" in data[0]


def heldout_metrics(model, tokenizer, data: list[dict] | None, items: list[EvalItem], settings: HeldOutSettings, *,
                    objective=None, ref=None) -> dict[str, Any]:
    """The metrics of the module docstring for encoded held-out `data` and exact-match `items` (either may be
    empty). `objective` / `ref`: the run's, for preference pairs (None: reference-free metrics only)."""
    from tunelab.evaluate.tasks import exact_match
    from tunelab.objectives.base import build_objective
    from tunelab.objectives.preference_eval import evaluate_preferences
    from tunelab.train.loop import evaluate_loss

    s = settings
    results: dict[str, Any] = {}
    pad_id = tokenizer.pad_token_id
    scalar = model_head(model) != "causal_lm"  # a reward model: it scores pairs, it generates nothing
    if is_pairs(data):
        if scalar and objective is None:  # `tunelab eval` of a reward model: its own pairwise metrics
            objective = build_objective("reward", {})
        preference = objective is not None and objective.batch_kind == "preference"
        # SimPO needs no reference: its log-probs and preference accuracy are the model's own
        pref = evaluate_preferences(model, objective if preference else build_objective("simpo", {}), data,
                                    batch_size=s.batch_size, pad_id=pad_id, device=s.device, precision=s.precision,
                                    ref=ref if preference else None)
        if preference:
            results.update(pref)
            if "rewards/accuracies" in pref:
                results["reward_accuracy"] = pref["rewards/accuracies"]
        else:
            results.update({k: pref[k] for k in REFERENCE_FREE})
    elif data and not scalar:  # no token loss without a vocabulary head
        ce = build_objective("sft", {"loss_weights": "ignore"})
        loss = evaluate_loss(model, ce, data, batch_size=s.batch_size, pad_id=pad_id, device=s.device,
                             precision=s.precision)
        results["eval_loss"] = loss
        results["perplexity"] = math.exp(min(loss, 50.0))
    if items and not scalar:
        results.update(exact_match(model, tokenizer, items, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                                   precision=s.precision, progress=s.progress))
    return results
