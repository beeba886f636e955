"""Knowledge distillation: token-level KL between a teacher's and a student's next-token distributions.

`token_kl` is the pure function (what the tests check); the `Distill` objective at the end of the
file runs the two models and calls it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.core.constants import IGNORE_INDEX
from tunelab.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 1.0,
    direction: Literal["forward", "reverse"] = "forward",
) -> torch.Tensor:
    """Per-token KL divergence at temperature T, times T^2 (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

    p_t = softmax(teacher / T), p_s = softmax(student / T);
    forward: T^2 * KL(p_t || p_s) = T^2 sum_v p_t (log p_t - log p_s)   (mode-covering, classic KD);
    reverse: T^2 * KL(p_s || p_t) = T^2 sum_v p_s (log p_s - log p_t)   (mode-seeking, MiniLLM/GKD).

    The T^2 factor keeps the gradient magnitude independent of T (Hinton, Sec. 2). TRL's
    `GKDTrainer.generalized_jsd_loss` with beta=0 (forward) / beta=1 (reverse) is the same without
    the T^2 factor.

    student_logits, teacher_logits: [..., V], already aligned position by position (for causal LMs
    pass logits[:, :-1] of both, with mask = labels[:, 1:] != -100). mask: [...] bool, or None for
    every position. Returns the KL of the selected positions, [N] in (at least) fp32, in row-major order.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    if mask is not None:
        mask = mask.to(torch.bool)
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    else:
        student_logits = student_logits.reshape(-1, student_logits.size(-1))
        teacher_logits = teacher_logits.reshape(-1, teacher_logits.size(-1))
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return kl * (temperature**2)


# ==============================================================================================
# Objective (runs models). Everything above is pure tensor code.
# ==============================================================================================



class DistillOptions(ObjectiveOptions):
    temperature: float = Field(1.0, gt=0)
    direction: Literal["forward", "reverse"] = "forward"
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)  # weight of the hard-label cross-entropy on the same tokens
    # the teacher in a recipe: a model name_or_path (same tokenizer) loaded by the runner; None = a frozen copy of
    # the initial student (self-distillation, an anchor to the starting point)
    teacher: str | None = None


@register_objective("distill", paper="https://arxiv.org/abs/1503.02531")
class Distill(Objective):
    """Token-level distillation on the target tokens (labels != -100) of an SFT batch. Unit: token.

    loss per token = kl_weight * token_kl(...) + ce_weight * CE(label). The teacher comes from the
    objective's context (`build_objective(..., teacher=model)`) or, failing that, from `ref.model`
    (e.g. a `FrozenCopyReference`); it runs under no_grad. Teacher and student must share the
    tokenizer; if their vocabularies are padded to different sizes, the common first V entries are
    compared.
    """

    Config = DistillOptions
    config: DistillOptions  # the validated options, typed
    unit = "token"
    batch_kind = "sft"

    def reference_use(self) -> str:
        return "model"

    def _teacher(self, ref):
        teacher = self.context.get("teacher")
        if teacher is None and ref is not None:
            teacher = getattr(ref, "model", None)
        if teacher is None:
            raise ValueError("distill needs a teacher: build_objective(..., teacher=model) or a ref with .model")
        return teacher

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        teacher = self._teacher(ref)
        ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        student_logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=att, use_cache=False).logits
        v = min(student_logits.size(-1), teacher_logits.size(-1))
        s, t = student_logits[:, :-1, :v], teacher_logits[:, :-1, :v].to(student_logits.device)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        kl = token_kl(s, t, mask, cfg.temperature, cfg.direction)
        loss_sum = cfg.kl_weight * kl.sum()
        metrics = {"kl": kl.detach().sum()}
        if cfg.ce_weight > 0:
            ce = F.cross_entropy(student_logits[:, :-1][mask].float(), targets[mask], reduction="sum")
            loss_sum = loss_sum + cfg.ce_weight * ce
            metrics["ce"] = ce.detach()
        return ObjectiveOutput(loss_sum=loss_sum, n_units=mask.sum(), metrics=metrics)


__all__ = ["token_kl", "Distill", "DistillOptions"]
