"""Preference-optimisation losses (DPO family, SimPO, ORPO, KTO) and their objectives.

The first part of this module is pure tensor code: every loss takes per-sequence log-probabilities
(shape [B], summed over the response tokens, or averaged where the method is length-normalised) and
returns a `PreferenceLoss(losses [B], chosen_rewards, rejected_rewards)`. Nothing in it touches a
model, so it is what the tests check against hand-computed numbers and against TRL.

Conventions shared by all functions:
* `pol_*` are the policy's log-probs, `ref_*` the reference model's; `*_c` chosen, `*_r` rejected.
* Log-probs are SUMS over the response tokens (labels != -100) unless the argument name says `_avg`.
* Losses are per example, not reduced: the objective returns their SUM and the loop normalises.
* Rewards are detached (they are for logging); for the DPO family they are beta * (pol - ref), as
  in TRL's `rewards/chosen` and `rewards/rejected`.

The second part (at the end of the file, clearly separated) holds the `Reference` implementations
and the thin `Objective` classes that run the model and call the functions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
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
    logits = _upcast(logits[:, :-1])
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
    c, r = _upcast(pol_c_avg), _upcast(pol_r_avg)
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


# ==============================================================================================
# Model side: references and Objective classes.
# Everything above is pure tensor code; everything below runs models.
# ==============================================================================================


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.size(1) == length:
        return x
    return F.pad(x, (0, length - x.size(1)), value=value)


def concatenate_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack chosen over rejected (right-padded to a common length) for one forward pass.

    Returns (input_ids, attention_mask, labels), each [2B, T]; rows [:B] are chosen, [B:] rejected.
    Padding: input id 0 (never attended, never a target), attention 0, label -100.
    """
    t = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
    ids = torch.cat(
        [_pad_right(batch["chosen_input_ids"], t, 0), _pad_right(batch["rejected_input_ids"], t, 0)], dim=0
    )
    att = torch.cat(
        [_pad_right(batch["chosen_attention_mask"], t, 0), _pad_right(batch["rejected_attention_mask"], t, 0)], dim=0
    )
    lab = torch.cat(
        [_pad_right(batch["chosen_labels"], t, IGNORE_INDEX), _pad_right(batch["rejected_labels"], t, IGNORE_INDEX)],
        dim=0,
    )
    return ids, att, lab


def model_sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (sum_logps [N], n_tokens [N]) via `sequence_logps`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sequence_logps(out.logits, labels)


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Chosen and rejected in ONE concatenated forward: (pol_c, pol_r, n_c, n_r), each [B]."""
    ids, att, lab = concatenate_pair(batch)
    logps, n = model_sequence_logps(model, ids, att, lab)
    b = batch["chosen_input_ids"].size(0)
    return logps[:b], logps[b:], n[:b], n[b:]


@runtime_checkable
class Reference(Protocol):
    """Where reference log-probs come from (never differentiated)."""

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of a preference batch: (ref_chosen [B], ref_rejected [B])."""
        ...

    def logps_of(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Summed target log-probs of arbitrary right-padded sequences: [N] (used by KTO)."""
        ...


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Dropout off for the reference pass; every module's own training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


class _ReferenceBase:
    def _model_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        raise NotImplementedError

    def logps_of(self, input_ids, attention_mask, labels) -> torch.Tensor:
        return self._model_logps(input_ids, attention_mask, labels)

    def logps(self, batch):
        ids, att, lab = concatenate_pair(batch)
        out = self._model_logps(ids, att, lab)
        b = batch["chosen_input_ids"].size(0)
        return out[:b], out[b:]


class AdapterDisabledReference(_ReferenceBase):
    """The policy's own base model: a PEFT model with its adapter switched off (`disable_adapter()`).

    Runs under `torch.no_grad()` and in eval mode (dropout off); the adapter and the training flags
    are restored afterwards. Accepts a PeftModel or a wrapper (DDP, ...) whose `.module` is one.
    """

    def __init__(self, model: torch.nn.Module):
        inner = model
        while not hasattr(inner, "disable_adapter") and hasattr(inner, "module"):
            inner = inner.module
        if not hasattr(inner, "disable_adapter"):
            raise TypeError("AdapterDisabledReference needs a peft PeftModel (no `disable_adapter` found)")
        self.model = inner

    def _model_logps(self, input_ids, attention_mask, labels):
        with torch.no_grad(), _eval_mode(self.model), self.model.disable_adapter():
            return model_sequence_logps(self.model, input_ids, attention_mask, labels)[0]


class FrozenCopyReference(_ReferenceBase):
    """A separate, frozen reference model (e.g. the initial weights for full fine-tuning)."""

    def __init__(self, ref_model: torch.nn.Module):
        self.model = ref_model
        self.model.eval()
        self.model.requires_grad_(False)

    def _model_logps(self, input_ids, attention_mask, labels):
        with torch.no_grad():
            return model_sequence_logps(self.model, input_ids, attention_mask, labels)[0]


def default_reference(model: torch.nn.Module, ref: Reference | None) -> Reference:
    """`ref` if given; else the adapter-disabled policy when the model is a PEFT model; else an error."""
    if ref is not None:
        return ref
    try:
        return AdapterDisabledReference(model)
    except TypeError:
        raise ValueError(
            "this objective needs a reference model: pass `ref` (e.g. FrozenCopyReference) or train a PEFT adapter"
        ) from None


def mismatched_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's KL sequences: prompt of row i followed by the completion of row (i + shift) mod N.

    Prompt = the real tokens before a row's first target (label != -100); completion = the real
    tokens from that first target on, with their labels. Returns right-padded (ids, mask, labels).
    """
    n = input_ids.size(0)
    rows = []
    for i in range(n):
        j = (i + shift) % n
        real_i = attention_mask[i].bool()
        tgt_i = (labels[i] != IGNORE_INDEX).nonzero()
        start_i = int(tgt_i[0]) if len(tgt_i) else int(real_i.sum())
        tgt_j = (labels[j] != IGNORE_INDEX).nonzero()
        len_j = int(attention_mask[j].sum())
        start_j = int(tgt_j[0]) if len(tgt_j) else len_j
        ids = torch.cat([input_ids[i, :start_i], input_ids[j, start_j:len_j]])
        lab = torch.cat([torch.full((start_i,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device),
                         labels[j, start_j:len_j]])
        rows.append((ids, lab))
    t = max(len(r[0]) for r in rows)
    out_ids = input_ids.new_zeros((n, t))
    out_att = attention_mask.new_zeros((n, t))
    out_lab = labels.new_full((n, t), IGNORE_INDEX)
    for k, (ids, lab) in enumerate(rows):
        out_ids[k, : len(ids)] = ids
        out_att[k, : len(ids)] = 1
        out_lab[k, : len(lab)] = lab
    return out_ids, out_att, out_lab


def _pair_metrics(res: PreferenceLoss, pol_c, pol_r) -> dict[str, torch.Tensor]:
    """Per-micro-batch SUMS (the loop divides by n_units = number of pairs)."""
    c, r = res.chosen_rewards, res.rejected_rewards
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/margins": (c - r).sum(),
        "rewards/accuracies": (c > r).float().sum(),
        "logps/chosen": pol_c.detach().sum(),
        "logps/rejected": pol_r.detach().sum(),
    }


from pydantic import ConfigDict, Field  # noqa: E402

from tunelab.objectives.base import (  # noqa: E402
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    register_objective,
)


class DPOOptions(ObjectiveOptions):
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    rpo_alpha: float | None = Field(None, ge=0)  # RPO: + alpha * NLL of the chosen response per pair (TRL's rpo_alpha)


@register_objective("dpo", paper="https://arxiv.org/abs/2305.18290")
class DPO(Objective):
    """DPO and its reference-based variants (`loss_type`: sigmoid/cDPO, ipo, hinge, robust).

    One forward of the policy on chosen+rejected concatenated; reference log-probs from
    `batch["ref_chosen_logps"/"ref_rejected_logps"]` if precomputed, else from `ref`, else from the
    adapter-disabled policy (PEFT). Unit: one pair. With `rpo_alpha`, each pair's loss gains
    `rpo_alpha * rpo_nll` (logged as `nll`), which keeps the chosen response likely (RPO).
    """

    Config = DPOOptions
    unit = "example"
    batch_kind = "preference"

    def reference_use(self) -> str:
        return "logps"

    def compute(self, model, batch, ref: Reference | None = None) -> ObjectiveOutput:
        cfg = self.config
        pol_c, pol_r, n_c, n_r = pair_logps(model, batch)
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_c, ref_r = default_reference(model, ref).logps(batch)
        ref_c, ref_r = ref_c.to(pol_c), ref_r.to(pol_r)
        if cfg.loss_type == "sigmoid":
            res = dpo_sigmoid(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        elif cfg.loss_type == "ipo":
            res = ipo(pol_c, pol_r, ref_c, ref_r, cfg.beta, n_c, n_r)
        elif cfg.loss_type == "hinge":
            res = hinge(pol_c, pol_r, ref_c, ref_r, cfg.beta)
        else:
            res = robust_dpo(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        losses, metrics = res.losses, _pair_metrics(res, pol_c, pol_r)
        if cfg.rpo_alpha is not None:
            nll = rpo_nll(pol_c, n_c)
            losses = losses + cfg.rpo_alpha * nll
            metrics["nll"] = nll.detach().sum()
        n = torch.tensor(pol_c.numel(), device=pol_c.device)
        return ObjectiveOutput(loss_sum=losses.sum(), n_units=n, metrics=metrics)


class SimPOOptions(ObjectiveOptions):
    beta: float = Field(2.0, gt=0)
    gamma: float = 1.0  # target reward margin; the paper tunes gamma/beta in about [0.3, 0.8]
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)


@register_objective("simpo", paper="https://arxiv.org/abs/2405.14734")
class SimPO(Objective):
    """SimPO: length-normalised log-prob margin, no reference model. Unit: one pair."""

    Config = SimPOOptions
    unit = "example"
    batch_kind = "preference"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        pol_c, pol_r, n_c, n_r = pair_logps(model, batch)
        c_avg, r_avg = average_logps(pol_c, n_c), average_logps(pol_r, n_r)
        res = simpo(c_avg, r_avg, cfg.beta, cfg.gamma, cfg.label_smoothing)
        n = torch.tensor(pol_c.numel(), device=pol_c.device)
        return ObjectiveOutput(loss_sum=res.losses.sum(), n_units=n, metrics=_pair_metrics(res, pol_c, pol_r))


class ORPOOptions(ObjectiveOptions):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float = Field(0.1, gt=0, alias="lambda")  # the paper's lambda; TRL's ORPOConfig.beta


@register_objective("orpo", paper="https://arxiv.org/abs/2403.07691")
class ORPO(Objective):
    """ORPO: per pair, NLL of the chosen response (mean over its target tokens) + the odds-ratio term.

    Unlike TRL (whose NLL averages over all tokens of the micro-batch and includes the prompt), the
    NLL here is each pair's own per-token average over the chosen response's target tokens (the
    labels), so that the sum over pairs / number of pairs is the paper's Eq. 6 at any batching.
    """

    Config = ORPOOptions
    unit = "example"
    batch_kind = "preference"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        pol_c, pol_r, n_c, n_r = pair_logps(model, batch)
        c_avg, r_avg = average_logps(pol_c, n_c), average_logps(pol_r, n_r)
        res = orpo(c_avg, r_avg, self.config.lam)
        nll = -c_avg
        metrics = _pair_metrics(res, pol_c, pol_r)
        metrics["nll"] = nll.detach().sum()
        metrics["log_odds_ratio"] = orpo_log_odds(_upcast(c_avg), _upcast(r_avg)).detach().sum()
        n = torch.tensor(pol_c.numel(), device=pol_c.device)
        return ObjectiveOutput(loss_sum=(nll + res.losses).sum(), n_units=n, metrics=metrics)


class KTOOptions(ObjectiveOptions):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, ge=0)
    undesirable_weight: float = Field(1.0, ge=0)


@register_objective("kto", paper="https://arxiv.org/abs/2402.01306")
class KTO(Objective):
    """KTO on unpaired examples. Unit: one example.

    Batches: either unpaired (`input_ids`, `attention_mask`, `labels`, `desirable` [N] bool), or a
    preference batch, whose chosen rows become desirable and rejected rows undesirable examples.
    The reference point z0 is estimated on mismatched pairs (prompt i, completion i+1) built from
    the same micro-batch (or taken from `kl_input_ids`/`kl_attention_mask`/`kl_labels` if given),
    with no gradient, as in TRL.
    """

    Config = KTOOptions
    unit = "example"
    batch_kind = "preference"

    def reference_use(self) -> str:
        return "live"

    def compute(self, model, batch, ref: Reference | None = None) -> ObjectiveOutput:
        cfg = self.config
        if "desirable" in batch:
            ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
            desirable = batch["desirable"].to(torch.bool)
        else:
            ids, att, lab = concatenate_pair(batch)
            b = batch["chosen_input_ids"].size(0)
            desirable = torch.arange(2 * b, device=ids.device) < b
        reference = default_reference(model, ref)
        pol, _ = model_sequence_logps(model, ids, att, lab)
        ref_logps = reference.logps_of(ids, att, lab).to(pol)
        if "kl_input_ids" in batch:
            kl_ids, kl_att, kl_lab = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        else:
            kl_ids, kl_att, kl_lab = mismatched_pairs(ids, att, lab)
        with torch.no_grad(), _eval_mode(model):  # a constant (as in TRL); no dropout in the estimate
            pol_kl, _ = model_sequence_logps(model, kl_ids, kl_att, kl_lab)
        z0 = kto_kl_estimate(pol_kl, reference.logps_of(kl_ids, kl_att, kl_lab).to(pol_kl))
        res = kto(pol, ref_logps, desirable, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        n_all = pol.numel()
        n_d = int(desirable.sum())
        # The loop divides every metric by n_units = N; these are scaled so that, for one
        # micro-batch, the logged value is z0 and the mean reward over the desirable / undesirable
        # examples (over several micro-batches: an N-weighted average of those).
        metrics = {
            "kl": z0 * n_all,
            "desirable_fraction": desirable.float().sum(),
            "logps/all": pol.detach().sum(),
        }
        if n_d > 0:
            metrics["rewards/chosen"] = res.chosen_rewards.sum() * (n_all / n_d)
        if n_all - n_d > 0:
            metrics["rewards/rejected"] = res.rejected_rewards.sum() * (n_all / (n_all - n_d))
        n = torch.tensor(n_all, device=pol.device)
        return ObjectiveOutput(loss_sum=res.losses.sum(), n_units=n, metrics=metrics)


__all__ = [
    "IGNORE_INDEX",
    "PreferenceLoss",
    "token_logps",
    "sequence_logps",
    "average_logps",
    "dpo_sigmoid",
    "ipo",
    "hinge",
    "robust_dpo",
    "rpo_nll",
    "simpo",
    "orpo",
    "orpo_log_odds",
    "kto",
    "kto_kl_estimate",
    "concatenate_pair",
    "pair_logps",
    "model_sequence_logps",
    "mismatched_pairs",
    "Reference",
    "AdapterDisabledReference",
    "FrozenCopyReference",
    "default_reference",
    "DPO",
    "SimPO",
    "ORPO",
    "KTO",
]
