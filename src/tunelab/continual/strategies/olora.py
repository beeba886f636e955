"""O-LoRA: orthogonal subspace learning — a new LoRA per task, kept orthogonal to earlier tasks' LoRAs.

Wang et al. 2023, https://arxiv.org/abs/2310.14152 (code: github.com/cmnfriend/O-LoRA). Stage 0 trains the
method's LoRA (adapter "default"); every later stage s adds a fresh LoRA "task<s>" with the same config,
freezes every earlier one, and keeps all of them active (the model's update is the sum of all tasks'
B_j A_j). Loss terms, as in the authors' code:

  orth  lambda_1 * sum_modules sum_{j<s} sum |A_j A_s^T|      A_j [r, in]: elementwise L1 of the [r, r] overlap
  l2    lambda_2 * sum_{p in the new LoRA's A and B} ||p||_2     (Frobenius norm, not squared)
Defaults lambda_1 = 0.5, lambda_2 = 0 (the authors' scripts). Needs `base.method.name: lora`. Export: the
PEFT adapter directory holds every task's adapter ("default" at the top, the others in sub-directories);
the merged model folds all of them in.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyError, StrategyOptions, register_strategy, unwrap

_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def adapter_name(stage: int) -> str:
    return "default" if stage == 0 else f"task{stage}"


def orthogonality(old: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """sum_j sum |A_j @ new^T| for the A matrices of earlier tasks (each [r_j, in]) and the new one [r, in]."""
    total = new.sum() * 0.0
    for a in old:
        total = total + (a.to(new.dtype) @ new.T).abs().sum()  # [r_j, r]
    return total


def lora_a_by_module(model: torch.nn.Module) -> dict[str, dict[str, torch.nn.Parameter]]:
    """{module path: {adapter name: its lora_A weight [r, in]}}."""
    out: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if m := _A.match(name):
            out.setdefault(m["module"], {})[m["adapter"]] = p
    return out


@register_strategy("olora", paper="https://arxiv.org/abs/2310.14152")
class OLoRA(Strategy):
    """A new LoRA per task, penalised for overlapping earlier tasks' LoRA subspaces; earlier LoRAs frozen."""

    class Config(StrategyOptions):
        lambda_1: float = Field(0.5, ge=0, description="Weight of the orthogonality term.")
        lambda_2: float = Field(0.0, ge=0, description="Weight of the L2 norm of the new LoRA.")

    def __init__(self, config=None):
        super().__init__(config)
        self.stage = 0
        self.pairs: list[tuple[list[torch.Tensor], torch.nn.Parameter]] = []
        self.new_params: list[torch.nn.Parameter] = []

    def check(self, ctx):
        if ctx.recipe.base.method.name != "lora":
            raise StrategyError(f"strategy olora needs base.method.name: lora (got {ctx.recipe.base.method.name!r})")

    def prepare_stage(self, ctx, model, stage):
        if stage == 0:
            return model
        peft_model = unwrap(model)
        name = adapter_name(stage)
        if name not in peft_model.peft_config:
            peft_model.add_adapter(name, peft_model.peft_config["default"])
        names = [adapter_name(s) for s in range(stage + 1)]
        peft_model.base_model.set_adapter(names)  # all active: the model is the sum of every task's LoRA
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.requires_grad_(f".{name}." in pname)
        return model

    def before_stage(self, ctx, model, stage):
        self.stage = stage
        new = adapter_name(stage)
        self.pairs = [([a for k, a in ads.items() if k != new], ads[new])
                      for ads in lora_a_by_module(model).values() if new in ads]
        self.new_params = [p for n, p in unwrap(model).named_parameters() if f".{new}.weight" in n and "lora_" in n]

    def loss_terms(self, model, batch):
        terms = {}
        if self.stage > 0 and self.config.lambda_1 > 0:
            terms["orth"] = self.config.lambda_1 * sum(orthogonality([a.detach() for a in old], a_new)
                                                       for old, a_new in self.pairs)
        if self.config.lambda_2 > 0:
            terms["l2"] = self.config.lambda_2 * sum(p.float().norm() for p in self.new_params)
        return terms

    def extra_state_names(self, model):
        return {n for n, _ in unwrap(model).named_parameters() if ".lora_" in n}
