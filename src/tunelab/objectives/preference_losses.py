"""Preference-optimisation losses (DPO family, SimPO, ORPO, KTO) and the reward-model loss as pure tensor functions.

Every loss takes per-sequence log-probabilities (shape [B], summed over the response tokens, or averaged
where the method is length-normalised) and returns a `PreferenceLoss(losses [B], chosen_rewards,
rejected_rewards)`. Nothing here touches a model, so it is what the tests check against hand-computed
numbers and against TRL. The objectives that run models and call these are in `objectives/preference.py`;
the reference models in `objectives/references.py`.

Conventions shared by all functions:
* `pol_*` are the policy's log-probs, `ref_*` the reference model's; `*_c` chosen, `*_r` rejected.
* Log-probs are SUMS over the response tokens (labels != -100) unless the argument name says `_avg`.
* Losses are per example, not reduced: the objective returns their SUM and the loop normalises.
* Rewards are detached (they are for logging); for the DPO family they are beta * (pol - ref), as
  in TRL's `rewards/chosen` and `rewards/rejected`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tunelab.core.constants import IGNORE_INDEX


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp16/bf16 -> fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # [B] per-example losses (not reduced)
    chosen_rewards: torch.Tensor  # detached; [B] for paired losses, [n_desirable] for KTO
    rejected_rewards: torch.Tensor  # detached; [B] for paired losses, [n_undesirable] for KTO


# ----------------------------------------------------------------------------------------------
# Log-probabilities of sequences
# ----------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the next-token targets.

    logits [B, T, V], labels [B, T] (-100 = no target). With the usual one-position shift,
    logits[:, :-1] predict labels[:, 1:]. Returns (logps [B, T-1] in >= fp32, zero where masked;
    mask [B, T-1] bool).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    logits = upcast(logits[:, :-1])
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's target tokens and their count.

    logits [B, T, V], labels [B, T] with -100 on prompt and padding; logits[:, :-1] predict
    labels[:, 1:]. Returns (sum_logps [B] in >= fp32, n_tokens [B] int64). The per-token average
    (SimPO, ORPO) is `sum_logps / n_tokens.clamp(min=1)`.
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def average_logps(sum_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-prob: sum / max(n, 1)."""
    return sum_logps / n_tokens.clamp(min=1).to(sum_logps.dtype)


# ----------------------------------------------------------------------------------------------
# Losses with a reference model (DPO family)
# ----------------------------------------------------------------------------------------------


def _rewards(pol_c, pol_r, ref_c, ref_r, beta):
    return (beta * (pol_c - ref_c)).detach(), (beta * (pol_r - ref_r)).detach()


def dpo_sigmoid(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with cDPO label smoothing.

    h = (pol_c - ref_c) - (pol_r - ref_r);  loss = -(1-eps) log sigma(beta h) - eps log sigma(-beta h).

    `label_smoothing` = eps is the conservative DPO (cDPO, Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf) assumption that a label is flipped with probability eps; eps=0
    is plain DPO. (TRL 1.16's DPOTrainer no longer applies label_smoothing to "sigmoid"; the
    identical formula is its `cpo_loss("sigmoid")` on log-ratios, or a (1-eps, eps) mix of the
    "sigmoid" loss on (chosen, rejected) and on the swapped pair.)
    """
    h = (pol_c - ref_c) - (pol_r - ref_r)
    losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return PreferenceLoss(losses, *_rewards(pol_c, pol_r, ref_c, ref_r, beta))


def ipo(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17), TRL's per-token convention.

    loss = ((pol_c - ref_c) / n_c - (pol_r - ref_r) / n_r - 1 / (2 beta))^2.

    `n_c`, `n_r` are the numbers of response tokens (clamped to >= 1). The paper writes the
    log-ratios of whole sequences; TRL (since 0.9, confirmed with the IPO authors) divides each
    sequence's log-ratio by its number of completion tokens so that beta (the paper's tau) does not
    depend on the response length; we follow TRL. Rewards are the unnormalised beta * (pol - ref),
    as TRL logs them.
    """
    nc = n_c.clamp(min=1).to(pol_c.dtype)
    nr = n_r.clamp(min=1).to(pol_r.dtype)
    delta = (pol_c - ref_c) / nc - (pol_r - ref_r) / nr
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, *_rewards(pol_c, pol_r, ref_c, ref_r, beta))


def hinge(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """Hinge loss of SLiC (Zhao et al. 2023, https://arxiv.org/abs/2305.10425) on DPO's log-ratios.

    h = (pol_c - ref_c) - (pol_r - ref_r);  loss = max(0, 1 - beta h)   (TRL loss_type="hinge").
    """
    h = (pol_c - ref_c) - (pol_r - ref_r)
    losses = torch.relu(1.0 - beta * h)
    return PreferenceLoss(losses, *_rewards(pol_c, pol_r, ref_c, ref_r, beta))


def robust_dpo(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409), TRL loss_type="robust".

    loss = [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps),  eps in [0, 0.5).

    eps = `label_smoothing` is the probability that a preference label was flipped; the loss is an
    unbiased estimate of the DPO loss on the clean labels (unlike cDPO it can be negative).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h = (pol_c - ref_c) - (pol_r - ref_r)
    clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    return PreferenceLoss(losses, *_rewards(pol_c, pol_r, ref_c, ref_r, beta))


def rpo_nll(pol_c: torch.Tensor, n_c: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024, https://arxiv.org/abs/2404.19733, Eq. 2): per pair, the chosen
    response's negative log-likelihood divided by its length, -pol_c / n_c (n_c clamped to >= 1).

    DPO with `rpo_alpha` adds alpha * rpo_nll per pair. This is TRL's `rpo_alpha` (TRL >= 1.x:
    `loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]`), whose "sft" term is the token mean of the chosen
    NLL over the micro-batch; the two agree on any batch whose chosen responses have equal lengths (the
    per-pair form keeps the sum-then-normalise contract of the loop at any batching).
    """
    return -pol_c / n_c.clamp(min=1).to(pol_c.dtype)


# ----------------------------------------------------------------------------------------------
# Reference-free losses
# ----------------------------------------------------------------------------------------------


def simpo(
    pol_c_avg: torch.Tensor,
    pol_r_avg: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6): no reference model.

    loss = -log sigma(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)   (gamma: target margin).

    Arguments are per-token AVERAGE log-probs. `label_smoothing` (default 0, as in the paper) mixes
    in the flipped term like TRL's CPOTrainer(loss_type="simpo"). Rewards: beta * avg log-prob.
    """
    z = beta * (pol_c_avg - pol_r_avg) - gamma
    losses = -F.logsigmoid(z) * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return PreferenceLoss(losses, (beta * pol_c_avg).detach(), (beta * pol_r_avg).detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(pol_c_avg: torch.Tensor, pol_r_avg: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l), odds(y) = P(y) / (1 - P(y)), P(y) = exp(avg log-prob)."""
    return (pol_c_avg - pol_r_avg) - (_log1mexp(pol_c_avg) - _log1mexp(pol_r_avg))


def orpo(pol_c_avg: torch.Tensor, pol_r_avg: torch.Tensor, lam: float) -> PreferenceLoss:
    """ORPO's odds-ratio term (Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eqs. 6-7).

    loss_OR = -lam * log sigma(log(odds(y_w) / odds(y_l))),  odds(y) = P(y)/(1-P(y)), log P = avg logp.

    Only the odds-ratio term: the ORPO objective adds the SFT NLL of the chosen response. Equals
    minus TRL's `ORPOTrainer.odds_ratio_loss(...)[0]` (TRL calls lam `beta`). Computed in >= fp32;
    averages are clamped to <= -1e-6 so that P = 1 cannot produce a NaN.
    Rewards: lam * avg log-prob (TRL's convention).
    """
    c, r = upcast(pol_c_avg), upcast(pol_r_avg)
    # An average log-prob of exactly 0 (P = 1, reachable in fp32) would give log(1 - P) = -inf and a
    # NaN gradient; keep it a hair below 0 (no effect on any average below -1e-6).
    c, r = c.clamp(max=-1e-6), r.clamp(max=-1e-6)
    losses = -lam * F.logsigmoid(orpo_log_odds(c, r))
    return PreferenceLoss(losses, (lam * c).detach(), (lam * r).detach())


# ----------------------------------------------------------------------------------------------
# KTO (unpaired)
# ----------------------------------------------------------------------------------------------


def kto_kl_estimate(pol_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: mean(pol - ref) over mismatched (x_i, y_j) pairs, clamped >= 0, detached.

    (TRL also averages over processes before clamping; here it is per micro-batch.)
    """
    return (pol_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto(
    pol_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable_mask: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7), TRL loss_type="kto".

    r = pol - ref;  loss = w_D (1 - sigma(beta (r - z0))) if desirable else w_U (1 - sigma(beta (z0 - r))).

    `kl_estimate` is z0 (see `kto_kl_estimate`), treated as a constant. Losses stay in the input
    order ([B], weights applied); rewards are beta * r split into the desirable [n_D] and
    undesirable [n_U] examples (TRL's `rewards/chosen`, `rewards/rejected`).
    """
    mask = desirable_mask.to(torch.bool)
    r = pol_logps - ref_logps
    z0 = torch.as_tensor(kl_estimate, dtype=r.dtype, device=r.device).detach()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(mask, desirable, undesirable)
    rewards = (beta * r).detach()
    return PreferenceLoss(losses, rewards[mask], rewards[~mask])


# ----------------------------------------------------------------------------------------------
# Reward models
# ----------------------------------------------------------------------------------------------


def bradley_terry(r_c: torch.Tensor, r_r: torch.Tensor, margin: torch.Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> PreferenceLoss:
    """Bradley-Terry reward-model loss (InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155), with
    Llama 2's per-pair margin (Touvron et al. 2023, https://arxiv.org/abs/2307.09288) and the reward-centring term
    of Eisenstein et al. 2023 (https://arxiv.org/abs/2312.09244), as TRL's RewardTrainer computes them:

        loss_i = -log sigma(r_c,i - r_r,i - m_i) + c * (r_c,i + r_r,i)^2

    r_c, r_r [B]: the scalar rewards of the chosen and rejected sequences; m [B] (None: 0); c =
    `center_rewards_coefficient` (None: no centring term). Per pair, not reduced: the mean over pairs is TRL's
    `-logsigmoid(...).mean() + c * ((r_c + r_r) ** 2).mean()`. The rewards returned are r_c, r_r, detached.
    """
    r_c, r_r = upcast(r_c), upcast(r_r)
    diff = r_c - r_r
    if margin is not None:
        diff = diff - margin.to(diff)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (r_c + r_r) ** 2
    return PreferenceLoss(losses, r_c.detach(), r_r.detach())
