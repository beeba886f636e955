"""RLOO and REINFORCE++: REINFORCE with a baseline, KL to the reference folded into the reward.

RLOO (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024,
https://arxiv.org/abs/2402.14740), as TRL 1.16's RLOOTrainer:

    r_i    = sum_k w_k r_k,i - beta * sum_t (log pi_old - log pi_ref)_i,t        (k1 KL, in the reward)
    A_i    = r_i - mean_{j != i in group} r_j                                      (leave-one-out baseline)
    rho_i  = exp(sum_t log pi_i,t - sum_t log pi_old_i,t)                          (one ratio per sequence)
    loss   = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)

with `normalize_advantages` standardising A over the batch.

REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262): no critic and no group baseline; the reward at the
last token minus the per-token k1 KL, summed to go, normalised over every token of the batch
(advantages.reinforce_pp), then the token-level clipped surrogate aggregated like GRPO's `loss_type`.
`baseline: group` is REINFORCE++-baseline (the group mean subtracted first). It works with one completion
per prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.objectives.advantages import leave_one_out, reinforce_pp
from tunelab.objectives.base import ObjectiveOutput, register_objective
from tunelab.objectives.grpo import policy_metrics
from tunelab.objectives.policy_losses import aggregate, clipped_policy_loss
from tunelab.objectives.rl_base import RLObjective, RLOptions, completion_logps


class RLOOOptions(RLOptions):
    beta: float = Field(0.05, ge=0, description="KL coefficient, in the reward (TRL's RLOO default 0.05).")
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0, description="None = epsilon.")
    normalize_advantages: bool = Field(False, description="Standardise the advantages over the batch.")
    mask_truncated_completions: bool = False


def _needs_old(objective, num_iterations: int) -> bool:
    return num_iterations > 1 or objective.needs_reference()


class _KLInReward(RLObjective):
    """Shared: the sampling policy's log-probs are kept when the KL (in the reward) or several updates need them."""

    def prepare_rollouts(self, model, batch, *, ref=None, gather=None, num_iterations=1, group_size):
        if _needs_old(self, num_iterations) and num_iterations == 1:
            batch["old_per_token_logps"] = completion_logps(model, batch, float(batch["temperature"]))[0].detach()
        batch["num_iterations"] = torch.tensor(num_iterations)
        return super().prepare_rollouts(model, batch, ref=ref, gather=gather, num_iterations=num_iterations,
                                        group_size=group_size)

    def kl_tokens(self, batch) -> torch.Tensor | None:
        """k1 = log pi_old - log pi_ref per token [B, C] (masked), or None without a KL term."""
        if not self.needs_reference():
            return None
        return (batch["old_per_token_logps"] - batch["ref_per_token_logps"]) * batch["completion_mask"]

    @staticmethod
    def old_for_ratio(batch, logps):
        """The sampling policy's log-probs for the ratio; with one update per generation, the current ones
        detached (ratio exactly 1, the same gradient)."""
        if int(batch.get("num_iterations", torch.tensor(1))) > 1:
            return batch["old_per_token_logps"]
        return logps.detach()


@register_objective("rloo", paper="https://arxiv.org/abs/2402.14740")
class RLOO(_KLInReward):
    """REINFORCE Leave-One-Out (module docstring)."""

    Config = RLOOOptions
    config: RLOOOptions  # the validated options, typed

    def advantages(self, batch, gather, group_size):
        rewards = batch["rewards"]
        kl = self.kl_tokens(batch)
        if kl is not None:
            rewards = rewards - self.config.beta * kl.sum(-1)
        adv = leave_one_out(gather.cat(rewards), group_size, self.config.normalize_advantages)
        batch["reward_zero_std"] = gather.local(adv.zero_std)
        return gather.local(adv.values)

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logps, entropy = completion_logps(model, batch, float(batch["temperature"]), with_entropy=True)
        old = self.old_for_ratio(batch, logps)
        seq = (logps * mask).sum(-1, keepdim=True)  # [B, 1]: one ratio per sequence
        seq_old = (old * mask).sum(-1, keepdim=True)
        eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        res = clipped_policy_loss(seq, seq_old, batch["advantages"], torch.ones_like(seq), epsilon_low=cfg.epsilon,
                                  epsilon_high=eps_high)
        s, t = float(batch["step_sequences"]), float(batch["step_tokens"])
        metrics = policy_metrics(res, entropy, mask, s, t)
        kl = self.kl_tokens(batch)
        if kl is not None:
            metrics["kl"] = (kl.sum() * (s / max(t, 1.0))).detach()
        return ObjectiveOutput(res.per_token.sum(), torch.tensor(float(mask.size(0))), metrics)


class ReinforcePPOptions(RLOptions):
    beta: float = Field(0.01, ge=0, description="Per-token KL penalty in the reward (k1).")
    baseline: Literal["none", "group"] = Field("none", description="group = REINFORCE++-baseline.")
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0, description="None = epsilon.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Token-loss aggregation.")
    mask_truncated_completions: bool = False


@register_objective("reinforce_pp", paper="https://arxiv.org/abs/2501.03262")
class ReinforcePP(_KLInReward):
    """REINFORCE++ (module docstring): token-level, batch-normalised advantages."""

    Config = ReinforcePPOptions
    config: ReinforcePPOptions  # the validated options, typed

    @property
    def min_group_size(self) -> int:  # type: ignore[override]
        return 2 if self.config.baseline == "group" else 1

    def advantages(self, batch, gather, group_size):
        mask = batch["completion_mask"]
        kl = self.kl_tokens(batch)
        c = int(batch["max_completion_length"])
        width = mask.size(1)

        def wide(x):  # pad [B, C] to the rollout's max length so every process's rows line up
            return torch.nn.functional.pad(x, (0, c - width)) if x is not None and width < c else x

        adv = reinforce_pp(gather.cat(batch["rewards"]), gather.cat(wide(mask)), group_size,
                           token_kl=gather.cat(wide(kl)) if kl is not None else None, kl_coef=self.config.beta,
                           baseline=self.config.baseline)
        batch["reward_zero_std"] = gather.local(adv.zero_std)
        return gather.local(adv.values)[:, :width]

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logps, entropy = completion_logps(model, batch, float(batch["temperature"]), with_entropy=True)
        eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        res = clipped_policy_loss(logps, self.old_for_ratio(batch, logps), batch["advantages"], mask,
                                  epsilon_low=cfg.epsilon, epsilon_high=eps_high)
        s, t = float(batch["step_sequences"]), float(batch["step_tokens"])
        loss_sum = aggregate(res.per_token, mask, cfg.loss_type, step_sequences=s, step_tokens=t,
                             max_completion_length=int(batch["max_completion_length"]))
        metrics = policy_metrics(res, entropy, mask, s, t)
        kl = self.kl_tokens(batch)
        if kl is not None:
            metrics["kl"] = (kl.sum() * (s / max(t, 1.0))).detach()
        return ObjectiveOutput(loss_sum, torch.tensor(float(mask.size(0))), metrics)
