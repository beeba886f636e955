"""LwF: learning without forgetting, by distillation to the previous stage's model on the new task's inputs.

Li & Hoiem 2016, https://arxiv.org/abs/1606.09282 (their temperature T = 2). For a causal LM the "old
task outputs" are the previous model's next-token distributions; here they are matched on the target tokens
of the new task's batches (the tokens the loss mask selects, as the cross-entropy):

  term (added to the mean loss)   weight * mean_{target tokens t} T^2 KL(p_prev,t^(T) || p_model,t^(T))
with p^(T) = softmax(logits / T) (tunelab.objectives.distill.token_kl, forward direction). The previous model
is a frozen copy of the model taken at the start of each stage s > 0 (one extra model in memory; for PEFT
adapters the copy shares nothing, so that the base can be cast or merged independently). The model's own
logits come from an extra forward pass (the objective's chunked cross-entropy never materialises them).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyOptions, register_strategy, unwrap
from tunelab.objectives.distill import token_kl
from tunelab.objectives.sft import model_inputs


def lwf_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Mean over target tokens of T^2 KL(teacher || student). logits [B, T, V] (position t predicts t+1),
    labels [B, T] with -100 where no loss. Returns an fp32 scalar (0 when there is no target token)."""
    mask = labels[:, 1:] != -100  # [B, T-1]
    if not mask.any():
        return student_logits.sum() * 0.0
    v = min(student_logits.size(-1), teacher_logits.size(-1))
    kl = token_kl(student_logits[:, :-1, :v], teacher_logits[:, :-1, :v].to(student_logits.device), mask,
                  temperature=temperature, direction="forward")  # [N target tokens]
    return kl.mean()


@register_strategy("lwf", paper="https://arxiv.org/abs/1606.09282")
class LwF(Strategy):
    """Distillation to the previous stage's model on the new task's inputs."""

    class Config(StrategyOptions):
        weight: float = Field(1.0, ge=0, description="Weight of the distillation term.")
        temperature: float = Field(2.0, gt=0, description="Softmax temperature T (the paper's 2).")

    def __init__(self, config=None):
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None

    def before_stage(self, ctx, model, stage):
        self.teacher = None
        if stage > 0:
            self.teacher = copy.deepcopy(unwrap(model)).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def loss_terms(self, model, batch):
        if self.teacher is None or self.config.weight == 0:
            return {}
        inputs = model_inputs(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits  # [B, T, V]
        logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        return {"kl": self.config.weight * lwf_kl(logits, teacher_logits, batch["labels"], self.config.temperature)}

    def after_stage(self, ctx, model, stage):
        self.teacher = None  # free the copy before evaluation
