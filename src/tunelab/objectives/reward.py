"""`objective: reward`: a Bradley-Terry reward model trained on preference pairs (the pairs DPO reads).

The model is the base with a scalar head (`head = "sequence_classification"`: transformers'
*ForSequenceClassification with one label, read at each row's last non-padding token, as TRL's RewardTrainer
trains it); `tunelab.model.load_model` builds it, adapter methods keep the head trainable (PEFT's
`modules_to_save`), and `tunelab export` writes a checkpoint that `AutoModelForSequenceClassification` loads and
that the `reward_model` reward scores with (docs/rl.md).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective
from tunelab.objectives.preference_losses import bradley_terry


class RewardOptions(ObjectiveOptions):
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Adds c * (r_chosen + r_rejected)^2 per pair, which keeps rewards centred on 0 "
                                "(TRL's center_rewards_coefficient; Eisenstein et al. 2023 use 0.01). null: off.")


def pair_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar rewards (r_chosen [B], r_rejected [B]) of a collated preference batch, in one forward pass.

    The collator pads both sides with the pad id to one shared width, so chosen and rejected stack as they are:
    ids/mask [2B, T]; the head reads the last token that is not the pad id (the model config's `pad_token_id`),
    exactly as an exported model scores a right-padded batch.
    """
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # [2B, T]
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # [2B, T]
    rewards = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, 0]  # [2B]
    b = batch["chosen_input_ids"].size(0)
    return rewards[:b], rewards[b:]


@register_objective("reward", paper="https://arxiv.org/abs/2203.02155")
class RewardModelObjective(Objective):
    """Bradley-Terry: loss per pair = -log sigma(r_c - r_r - m) [+ c (r_c + r_r)^2] (`bradley_terry`). Unit: one pair.

    m is the pair's `margin` field when the data has one (Llama 2; TRL's RewardTrainer reads the same field), else 0.
    Metrics per pair, named like DPO's: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `rewards/accuracies` (r_c > r_r: the pairwise accuracy).
    """

    Config = RewardOptions
    config: RewardOptions  # the validated options, typed
    unit = "example"
    batch_kind = "preference"
    head = "sequence_classification"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        r_c, r_r = pair_rewards(model, batch)
        res = bradley_terry(r_c, r_r, batch.get("margin"), self.config.center_rewards_coefficient)
        c, r = res.chosen_rewards, res.rejected_rewards
        metrics = {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margins": (c - r).sum(),
                   "rewards/accuracies": (c > r).float().sum()}
        n = torch.tensor(c.numel(), device=c.device)
        return ObjectiveOutput(loss_sum=res.losses.sum(), n_units=n, metrics=metrics)
