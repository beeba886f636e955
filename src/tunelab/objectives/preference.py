"""Preference objectives (DPO family, SimPO, ORPO, KTO): thin `Objective` classes that run the policy and the
reference and call the pure losses of `objectives/preference_losses.py`."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field

from tunelab.core.constants import IGNORE_INDEX
from tunelab.objectives.base import (
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    register_objective,
)
from tunelab.objectives.preference_losses import (
    PreferenceLoss,
    average_logps,
    dpo_sigmoid,
    hinge,
    ipo,
    kto,
    kto_kl_estimate,
    orpo,
    orpo_log_odds,
    robust_dpo,
    rpo_nll,
    simpo,
    upcast,
)
from tunelab.objectives.references import (
    Reference,
    concatenate_pair,
    default_reference,
    eval_mode,
    mismatched_pairs,
    model_sequence_logps,
    pair_logps,
)


def pair_metrics(res: PreferenceLoss, pol_c, pol_r) -> dict[str, torch.Tensor]:
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
    config: DPOOptions  # the validated options, typed
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
        losses, metrics = res.losses, pair_metrics(res, pol_c, pol_r)
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
    config: SimPOOptions  # the validated options, typed
    unit = "example"
    batch_kind = "preference"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        pol_c, pol_r, n_c, n_r = pair_logps(model, batch)
        c_avg, r_avg = average_logps(pol_c, n_c), average_logps(pol_r, n_r)
        res = simpo(c_avg, r_avg, cfg.beta, cfg.gamma, cfg.label_smoothing)
        n = torch.tensor(pol_c.numel(), device=pol_c.device)
        return ObjectiveOutput(loss_sum=res.losses.sum(), n_units=n, metrics=pair_metrics(res, pol_c, pol_r))


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
    config: ORPOOptions  # the validated options, typed
    unit = "example"
    batch_kind = "preference"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        pol_c, pol_r, n_c, n_r = pair_logps(model, batch)
        c_avg, r_avg = average_logps(pol_c, n_c), average_logps(pol_r, n_r)
        res = orpo(c_avg, r_avg, self.config.lam)
        nll = -c_avg
        metrics = pair_metrics(res, pol_c, pol_r)
        metrics["nll"] = nll.detach().sum()
        metrics["log_odds_ratio"] = orpo_log_odds(upcast(c_avg), upcast(r_avg)).detach().sum()
        n = torch.tensor(pol_c.numel(), device=pol_c.device)
        return ObjectiveOutput(loss_sum=(nll + res.losses).sum(), n_units=n, metrics=metrics)


def _prompt(ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor) -> tuple[int, ...]:
    """A row's prompt: its real tokens before the first target (label != -100). ids/att/lab [T]."""
    tgt = (lab != IGNORE_INDEX).nonzero()
    start = int(tgt[0]) if len(tgt) else int(att.sum())
    return tuple(ids[:start].tolist())


def distinct_prompt_pairs(ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """[N] bool: row i's prompt differs from row (i + shift) mod N's, i.e. `mismatched_pairs` row i is a
    genuine (x_i, y_j) pair with another prompt. ids/att/lab [N, T]."""
    prompts = [_prompt(ids[i], att[i], lab[i]) for i in range(ids.size(0))]
    n = len(prompts)
    return torch.tensor([prompts[i] != prompts[(i + shift) % n] for i in range(n)], dtype=torch.bool,
                        device=ids.device)


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

    z0 estimates KL(pi || pi_ref) with completions of OTHER prompts: a pair whose two rows share their
    prompt (a preference pair's chosen and rejected rows; one unpaired example paired with itself)
    gives the implied reward of a matched completion instead. Such pairs are left out of the
    estimate, and a micro-batch with no mismatched pair at all is refused (ValueError): a
    preference batch needs `train.batch_size >= 2` pairs with different prompts, an unpaired one
    >= 2 examples. TRL refuses per-device batch size 1 for the same reason.
    """

    Config = KTOOptions
    config: KTOOptions  # the validated options, typed
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
            keep = distinct_prompt_pairs(ids, att, lab)  # [N] row i's prompt differs from row i+1's
            if not bool(keep.any()):
                raise ValueError(
                    "objective kto: every KL pair of this micro-batch shares its prompt (one preference pair, or "
                    "one example), so z0 would be the implied reward, not a KL estimate. Use train.batch_size >= 2 "
                    "with different prompts (TRL refuses batch size 1 too), or give kl_input_ids/kl_labels.")
            kl_ids, kl_att, kl_lab = kl_ids[keep], kl_att[keep], kl_lab[keep]
        with torch.no_grad(), eval_mode(model):  # a constant (as in TRL); no dropout in the estimate
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
