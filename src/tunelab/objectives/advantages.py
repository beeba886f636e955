"""Advantages of on-line RL: rewards of sampled completions -> the weight each completion's log-prob gets.

Pure tensor functions (no model), written once and used by every RL objective; the tests check them against
TRL 1.16's GRPOTrainer / RLOOTrainer on the same rewards and against hand-computed cases.

Conventions:
* completions come in GROUPS of `group_size` consecutive rows, all sampled from the same prompt
  (rows [g*G, (g+1)*G) are prompt g's): `rewards` has shape [N] with N = n_prompts * G;
* a reward may be NaN: a completion no reward function could score (TRL: every function returned None).
  It is left out of every mean and standard deviation and its advantage is 0 (no learning signal);
* the standard deviation is the sample one (Bessel's correction, divisor n - 1), as `torch.std` and
  TRL's `nanstd`, and the scaled advantages divide by std + 1e-4 (TRL's epsilon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation ignoring NaNs: sqrt(mean((x - mean)^2) * n / (n - 1)) over the non-NaN entries
    (TRL's `nanstd`; NaN where fewer than two values are present)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    out = torch.sqrt(var * count / (count - 1))
    if not keepdim and dim is not None:
        out = out.squeeze(dim)
    elif not keepdim:
        out = out.reshape(())
    return out


@dataclass
class Advantages:
    values: torch.Tensor  # [N] (or [N, T] for token-level advantages), NaN-free
    std: torch.Tensor  # [N] the std each row was scaled by (for logging; group or batch std)
    zero_std: torch.Tensor  # [N] bool: the row's group (or batch) had rewards all equal: no signal


def group_relative(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> Advantages:
    """GRPO's group-relative advantage (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3):

        A_i = (r_i - mean(r_group(i))) / (std + 1e-4)

    with std = the group's std (`scale_rewards="group"`), the whole batch's std (`"batch"`: PPO-Lite,
    Liu et al. 2025, https://arxiv.org/abs/2508.08221) or no scaling at all (`"none"`: Dr. GRPO, Liu et al. 2025,
    https://arxiv.org/abs/2503.20783, removes the question-difficulty bias of the std). The mean is always the
    group's. Equals TRL 1.16 `GRPOTrainer` (multi_objective_aggregation="sum_then_normalize").
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    grouped = rewards.view(-1, group_size)  # [n_prompts, G]
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)  # [N]
    if scale_rewards in ("group", "none"):
        std = (nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1
               else torch.zeros_like(rewards))
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(adv, nan=0.0), std, zero_std)


def leave_one_out(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> Advantages:
    """RLOO's advantage (Kool et al. 2019; Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740):

        A_i = r_i - (sum_{j in group(i), j != i} r_j) / (n_group - 1)

    over the group's scorable completions; with `normalize`, then (A - mean(A)) / (std(A) + 1e-4) over the
    batch. Equals TRL 1.16 `RLOOTrainer` (`normalize_advantages`).
    """
    grouped = rewards.view(-1, group_size)
    std = nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    if group_size > 1:
        count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        total = torch.nansum(grouped, dim=1, keepdim=True)
        adv = (rewards - ((total - grouped) / (count - 1)).reshape(-1))
    else:
        adv = torch.zeros_like(rewards)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(adv, nan=0.0), std, zero_std)


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, *,
                 token_kl: torch.Tensor | None = None, kl_coef: float = 0.0, baseline: str = "none") -> Advantages:
    """REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262): token-level advantages, normalised over the batch.

        r_i,t = r_i * 1[t = last token] - beta * KL_i,t          (KL_i,t = log pi_old - log pi_ref, k1)
        A_i,t = sum_{s >= t} r_i,s                               (return to go, gamma = 1)
        A   <- (A - mean(A)) / (std(A) + 1e-4)                    (over every completion token of the batch)

    `baseline="group"` is REINFORCE++-baseline: r_i is first replaced by r_i - mean(r_group(i)), then the same
    global normalisation (no per-group std). Without KL (kl_coef 0 or `token_kl` None) every token of a
    completion has the same advantage. `mask` [N, T] marks completion tokens; NaN rewards give 0.
    """
    if baseline not in ("none", "group"):
        raise ValueError(f"baseline must be none or group, got {baseline!r}")
    valid = ~torch.isnan(rewards)
    r = torch.nan_to_num(rewards, nan=0.0)
    grouped = rewards.view(-1, group_size)
    std = nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    if baseline == "group":
        r = torch.where(valid, r - torch.nanmean(grouped, dim=1).repeat_interleave(group_size), r)
    m = mask.to(torch.float32 if not r.is_floating_point() else r.dtype)
    lengths = m.sum(dim=1).long()  # [N]
    token_r = torch.zeros_like(m)
    last = (lengths - 1).clamp(min=0)
    token_r[torch.arange(len(r)), last] = r * (lengths > 0)
    if token_kl is not None and kl_coef:
        token_r = token_r - kl_coef * token_kl * m
    ret = torch.flip(torch.cumsum(torch.flip(token_r * m, [1]), dim=1), [1])  # return to go [N, T]
    keep = m.bool() & valid.unsqueeze(1)
    flat = ret[keep]
    mean = flat.mean() if flat.numel() else ret.new_zeros(())
    sd = flat.std() if flat.numel() > 1 else ret.new_zeros(())
    adv = ((ret - mean) / (sd + STD_EPS)) * keep
    return Advantages(adv, std, torch.isclose(std, torch.zeros_like(std)))
