"""Clipped policy-gradient losses of the GRPO family as pure tensor functions (no model).

Shapes: B completions of one micro-batch, T = their (right-padded) completion width.
`logps`, `old_logps`, `ref_logps`, `mask`: [B, T] per-token log-probs of the sampled tokens (under
softmax(logits / temperature)) and the loss mask; `advantages`: [B] (or [B, T]).

    ratio_i,t  = exp(logps - old_logps)                               importance_sampling_level="token"
    ratio_i    = exp(sum_t mask (logps - old_logps) / |y_i|)          "sequence" (GSPO)
    l_i,t      = -min(ratio A_i, clip(ratio, 1 - eps_low, 1 + eps_high) A_i) + beta KL_i,t
    KL_i,t     = exp(ref - logps) - (ref - logps) - 1                 (Schulman's k3, always >= 0)

The KL term is added AFTER the importance weighting (it is not multiplied by the ratio), as in TRL.
`aggregate` turns l into one micro-batch's loss SUM for the training loop, which divides every step by the
step's number of completions (`unit = "example"`); see its docstring for each `loss_type`. For the same
inputs every loss equals TRL 1.16 `GRPOTrainer._compute_loss` (tests/objectives/test_rl_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020), [B, T]."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: mean over each row's masked tokens (0 for a row without any)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@dataclass
class PolicyLoss:
    per_token: torch.Tensor  # [B, T] l_i,t (before masking)
    ratio: torch.Tensor  # [B, T] or [B, 1]: the importance ratio (unclipped)
    kl: torch.Tensor | None  # [B, T] k3 KL per token, when beta != 0
    low_clipped: torch.Tensor  # bool, ratio's shape: ratio < 1 - eps_low where A < 0
    high_clipped: torch.Tensor  # bool: ratio > 1 + eps_high where A > 0


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                        epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                        ref_logps: torch.Tensor | None = None, importance_sampling_level: str = "token",
                        delta: float | None = None) -> PolicyLoss:
    """PPO-style clipped surrogate per token (see the module docstring); `delta` is INTELLECT-2's upper bound
    on the unclipped ratio (two-sided clipping, TRL's `delta`)."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if kl is not None:
        per_token = per_token + beta * kl
    return PolicyLoss(per_token, ratio, kl, (ratio < 1 - epsilon_low) & (adv < 0),
                      (ratio > 1 + epsilon_high) & (adv > 0))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *, step_sequences: float,
              step_tokens: float, max_completion_length: int) -> torch.Tensor:
    """One micro-batch's loss SUM; the loop divides the step's sum by `step_sequences` (S, all micro-batches and
    processes of the optimizer step; T_step their completion tokens; b = this micro-batch's B):

        grpo     sum_i mean_t l_i,t                 -> mean over sequences of the per-sequence token mean
        bnpo     b * (sum_i,t l / tokens of this micro-batch)   -> TRL: token mean of each micro-batch, averaged
        dr_grpo  sum_i,t l / max_completion_length  -> sum over tokens / (S * L_max)  (Dr. GRPO)
        dapo     sum_i,t l * S / T_step             -> sum over tokens / T_step: token mean of the whole
                                                       generation batch (DAPO, Yu et al. 2025)

    With micro-batches of equal size (what the rollout source makes) each equals TRL's loss under gradient
    accumulation exactly.
    """
    m = mask.to(per_token.dtype)
    b = per_token.size(0)
    if loss_type == "grpo":
        return masked_seq_mean(per_token, m).sum()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0) * b
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / max_completion_length
    if loss_type == "dapo":
        return (per_token * m).sum() * (step_sequences / max(step_tokens, 1.0))
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def token_mean_sum(x: torch.Tensor, mask: torch.Tensor, *, step_sequences: float, step_tokens: float) -> torch.Tensor:
    """A metric SUM that the loop's division by `step_sequences` turns into the token mean over the whole step:
    sum_t mask x * S / T_step. `x` of shape [B, 1] (one value per sequence, GSPO's ratio) is averaged over
    sequences instead (its plain sum), as TRL logs it."""
    if x.dim() == 2 and x.size(1) == 1:
        return x.float().sum().detach()
    m = mask.to(torch.float32)
    return ((x.float() * m).sum() * (step_sequences / max(step_tokens, 1.0))).detach()
