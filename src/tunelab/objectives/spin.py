"""SPIN: Self-Play fIne-tuNing (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", https://arxiv.org/abs/2401.01335, eq. 4.7 / alg. 1).

Round t+1 trains the main player p_theta to tell the human response y of a prompt x from the opponent's
generation y' ~ p_theta_t(. | x), where p_theta_t is the previous round's model (also the reference):

    L_SPIN(theta; theta_t) = E_{x, y, y'} [ l( lambda log p_theta(y | x) / p_theta_t(y | x)
                                              - lambda log p_theta(y' | x) / p_theta_t(y' | x) ) ]

with the logistic loss l(t) = log(1 + exp(-t)) (`loss_type: sigmoid`, the paper's choice) or the hinge
l(t) = max(0, 1 - t) (`loss_type: hinge`, the paper's ablation); log-probs are sums over the response tokens.
Formally it is DPO with chosen = the human response and rejected = the model's own generation, which is how it
runs here: pairs in the `preference` format, whose reference is the round's starting model (the adapter-disabled
base under an adapter method, or cached reference log-probs otherwise). `tunelab iterate` with
`strategy: spin` builds those pairs each round (docs/iterate.md). Unit: one pair.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective
from tunelab.objectives.preference import pair_metrics
from tunelab.objectives.preference_losses import PreferenceLoss
from tunelab.objectives.references import Reference, default_reference, pair_logps


def spin_loss(pol_h: torch.Tensor, pol_g: torch.Tensor, ref_h: torch.Tensor, ref_g: torch.Tensor, lam: float,
              loss_type: str = "sigmoid") -> PreferenceLoss:
    """[B] summed log-probs of the human responses (h) and generations (g) under the policy and the previous
    round's model -> per-pair losses l(lam * ((pol_h - ref_h) - (pol_g - ref_g))) and the implicit rewards
    lam * (pol - ref) of each side (detached)."""
    t = lam * ((pol_h - ref_h) - (pol_g - ref_g))
    losses = F.softplus(-t) if loss_type == "sigmoid" else torch.relu(1.0 - t)  # softplus(-t) = log(1 + e^-t)
    return PreferenceLoss(losses, (lam * (pol_h - ref_h)).detach(), (lam * (pol_g - ref_g)).detach())


class SPINOptions(ObjectiveOptions):
    beta: float = Field(0.1, gt=0, description="SPIN's lambda (the paper uses 0.1), named as DPO's beta.")
    loss_type: Literal["sigmoid", "hinge"] = Field("sigmoid", description="l(t): logistic (paper) or hinge.")


@register_objective("spin", paper="https://arxiv.org/abs/2401.01335")
class SPIN(Objective):
    """SPIN: the human response (chosen) against the previous round's generation (rejected), relative to the
    previous round's model; see the module docstring."""

    Config = SPINOptions
    config: SPINOptions
    unit = "example"
    batch_kind = "preference"

    def reference_use(self) -> str:
        return "logps"

    def compute(self, model, batch, ref: Reference | None = None) -> ObjectiveOutput:
        pol_h, pol_g, _, _ = pair_logps(model, batch)
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            ref_h, ref_g = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_h, ref_g = default_reference(model, ref).logps(batch)
        res = spin_loss(pol_h, pol_g, ref_h.to(pol_h), ref_g.to(pol_g), self.config.beta, self.config.loss_type)
        n = torch.tensor(pol_h.numel(), device=pol_h.device)
        return ObjectiveOutput(loss_sum=res.losses.sum(), n_units=n, metrics=pair_metrics(res, pol_h, pol_g))
