"""GRPO and its variants (Dr. GRPO, DAPO's loss, BNPO) and GSPO, with TRL's option names.

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300): G completions per prompt, the
group-relative advantage A_i = (r_i - mean_group r) / (std + 1e-4) (`scale_rewards`), and the clipped surrogate

    l_i,t = -min(rho_i,t A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_k3(pi || ref)_i,t,
    rho_i,t = pi(y_i,t | .) / pi_old(y_i,t | .)

aggregated by `loss_type` (objectives/policy_losses.aggregate): `grpo` per-sequence mean, `bnpo` token mean of
each micro-batch, `dr_grpo` sum / (B * max_completion_length) (Liu et al. 2025, https://arxiv.org/abs/2503.20783),
`dapo` token mean over the generation batch (Yu et al. 2025, https://arxiv.org/abs/2503.14476; with
`epsilon_high` = 0.28 its clip-higher). GSPO (Zheng et al. 2025, https://arxiv.org/abs/2507.18071) is
`importance_sampling_level: sequence`: one ratio per completion, exp(mean_t log rho_i,t).

Equal to TRL 1.16 GRPOTrainer for the same log-probs, rewards and masks (tests/objectives/test_rl_parity.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from tunelab.objectives.advantages import group_relative
from tunelab.objectives.base import ObjectiveOutput, register_objective
from tunelab.objectives.policy_losses import aggregate, clipped_policy_loss, token_mean_sum
from tunelab.objectives.rl_base import RLObjective, RLOptions, completion_logps


class GRPOOptions(RLOptions):
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="How token losses are aggregated (TRL's default: dapo).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (DAPO: 0.28); None = epsilon.")
    delta: float | None = Field(None, gt=1, description="Upper bound on the unclipped ratio (INTELLECT-2); None = off.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Std the advantages divide by.")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="sequence = GSPO.")
    mask_truncated_completions: bool = Field(False, description="Completions cut at the length limit carry no loss.")
    max_completion_length: int | None = Field(
        None, ge=1, description="dr_grpo's constant; None = the rollout's max_completion_length.")

    @model_validator(mode="after")
    def _eps_high(self) -> "GRPOOptions":
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        return self


@register_objective("grpo", paper="https://arxiv.org/abs/2402.03300")
class GRPO(RLObjective):
    """Group Relative Policy Optimization (module docstring has the formulas)."""

    Config = GRPOOptions
    config: GRPOOptions  # the validated options, typed

    def advantages(self, batch, gather, group_size):
        rewards = gather.cat(batch["rewards"])
        adv = group_relative(rewards, group_size, self.config.scale_rewards)
        batch["reward_zero_std"] = gather.local(adv.zero_std)
        return gather.local(adv.values)

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logps, entropy = completion_logps(model, batch, float(batch["temperature"]), with_entropy=True)
        old = batch.get("old_per_token_logps")
        res = clipped_policy_loss(logps, logps.detach() if old is None else old, batch["advantages"], mask,
                                  epsilon_low=cfg.epsilon, beta=cfg.beta,
                                  epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
                                  ref_logps=batch.get("ref_per_token_logps"),
                                  importance_sampling_level=cfg.importance_sampling_level, delta=cfg.delta)
        s, t = float(batch["step_sequences"]), float(batch["step_tokens"])
        max_len = cfg.max_completion_length or int(batch["max_completion_length"])
        loss_sum = aggregate(res.per_token, mask, cfg.loss_type, step_sequences=s, step_tokens=t,
                             max_completion_length=max_len)
        return ObjectiveOutput(loss_sum, torch.tensor(float(mask.size(0))), policy_metrics(res, entropy, mask, s, t))


def policy_metrics(res, entropy: torch.Tensor | None, mask: torch.Tensor, s: float,
                   t: float) -> dict[str, torch.Tensor]:
    """TRL's names: token means over the step (the loop divides these sums by the step's completions)."""
    out = {
        "clip_ratio/low_mean": token_mean_sum(res.low_clipped, mask, step_sequences=s, step_tokens=t),
        "clip_ratio/high_mean": token_mean_sum(res.high_clipped, mask, step_sequences=s, step_tokens=t),
        "clip_ratio/region_mean": token_mean_sum(res.low_clipped | res.high_clipped, mask, step_sequences=s,
                                                 step_tokens=t),
    }
    if entropy is not None:
        out["entropy"] = token_mean_sum(entropy, mask, step_sequences=s, step_tokens=t)
    if res.kl is not None:
        out["kl"] = token_mean_sum(res.kl.detach(), mask, step_sequences=s, step_tokens=t)
    return out


class GSPOOptions(GRPOOptions):
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    importance_sampling_level: Literal["token", "sequence"] = "sequence"
    epsilon: float = Field(3e-4, gt=0, description="GSPO's clipping range (paper: 3e-4 low, 4e-4 high).")
    epsilon_high: float | None = Field(4e-4, gt=0)


@register_objective("gspo", paper="https://arxiv.org/abs/2507.18071")
class GSPO(GRPO):
    """Group Sequence Policy Optimization: GRPO with one importance ratio per completion,
    rho_i = exp(mean_t (log pi - log pi_old)), clipped with the paper's ranges and averaged per sequence."""

    Config = GSPOOptions
    config: GSPOOptions  # the validated options, typed

