"""On-line DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
https://arxiv.org/abs/2402.04792): preference pairs from the policy's own samples, ranked by the reward.

For each prompt, of its G sampled completions the highest-rewarded is `chosen` and the lowest `rejected`
(a group whose best and worst rewards are equal gives no pair); then DPO against the reference:

    h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))     (sums over completion tokens)
    loss = -log sigmoid(beta h)            (`loss_type: ipo`: IPO with TRL's per-token log-ratios)

averaged over the step's pairs. The rows of a group must sit in one micro-batch: train.batch_size is a multiple
of rollout.num_generations (checked with the recipe); G = 2 wastes no compute on unpaired samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.objectives.base import ObjectiveOutput, register_objective
from tunelab.objectives.preference_losses import dpo_sigmoid, ipo
from tunelab.objectives.rl_base import RLObjective, RLOptions, completion_logps


class OnlineDPOOptions(RLOptions):
    beta: float = Field(0.1, gt=0, description="DPO's beta (strength of the implicit KL to the reference).")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    mask_truncated_completions: bool = False


def pair_roles(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards in groups of G -> [N] roles: +1 the group's first best, -1 its first worst, 0 the others
    (and the whole group when best == worst or every reward is NaN)."""
    grouped = torch.nan_to_num(rewards.view(-1, group_size), nan=float("-inf"))
    best = grouped.argmax(1)
    worst = torch.where(torch.isinf(grouped), float("inf"), grouped).argmin(1)
    valid = (grouped.max(1).values > torch.where(torch.isinf(grouped), float("inf"), grouped).min(1).values)
    roles = torch.zeros_like(grouped)
    rows = torch.arange(grouped.size(0))
    roles[rows[valid], best[valid]] = 1.0
    roles[rows[valid], worst[valid]] = -1.0
    return roles.view(-1)


@register_objective("online_dpo", paper="https://arxiv.org/abs/2402.04792")
class OnlineDPO(RLObjective):
    """DPO on pairs of the policy's own samples (module docstring)."""

    Config = OnlineDPOOptions
    config: OnlineDPOOptions  # the validated options, typed

    def needs_reference(self) -> bool:
        return True

    def advantages(self, batch, gather, group_size):
        roles = gather.cat(pair_roles(batch["rewards"], group_size) if group_size > 1 else
                           torch.zeros_like(batch["rewards"]))
        batch["group_size"] = torch.tensor(group_size)
        batch["step_pairs"] = torch.tensor(float((roles > 0).sum()))
        batch["reward_zero_std"] = gather.local(
            (roles.view(-1, group_size).abs().sum(1) == 0).repeat_interleave(group_size))
        return gather.local(roles)  # the role of each row: its "advantage" sign in the pair

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logps, _ = completion_logps(model, batch, float(batch["temperature"]))
        pol = (logps * mask).sum(-1)  # [B]
        refs = (batch["ref_per_token_logps"] * mask).sum(-1)
        roles = batch["advantages"]
        c, r = roles > 0, roles < 0
        s, pairs = float(batch["step_sequences"]), max(float(batch["step_pairs"]), 1.0)
        if not bool(c.any()):  # no pair in this micro-batch: a zero that keeps the graph
            return ObjectiveOutput(pol.sum() * 0.0, torch.tensor(float(mask.size(0))), {})
        # rows are in groups of G and a group has at most one chosen and one rejected: pair them group-wise
        g = int(batch["group_size"])
        grp = torch.arange(len(roles), device=roles.device) // g
        order_c, order_r = grp[c].argsort(), grp[r].argsort()
        pol_c, pol_r = pol[c][order_c], pol[r][order_r]
        ref_c, ref_r = refs[c][order_c], refs[r][order_r]
        if cfg.loss_type == "sigmoid":
            res = dpo_sigmoid(pol_c, pol_r, ref_c, ref_r, cfg.beta)
        else:
            n = mask.sum(-1).clamp(min=1.0)
            res = ipo(pol_c, pol_r, ref_c, ref_r, cfg.beta, n[c][order_c], n[r][order_r])
        w = s / pairs  # the loop divides the step's sum by its completions: this makes it a mean over pairs
        metrics = {"rewards/chosen": res.chosen_rewards.sum() * w, "rewards/rejected": res.rejected_rewards.sum() * w,
                   "rewards/margins": (res.chosen_rewards - res.rejected_rewards).sum() * w,
                   "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float().sum() * w}
        return ObjectiveOutput(res.losses.sum() * w, torch.tensor(float(mask.size(0))), metrics)
