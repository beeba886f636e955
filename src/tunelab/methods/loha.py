"""LoHa: low-rank Hadamard-product adaptation (LyCORIS), through HF PEFT (`LoHaConfig`).

Hyeon-Woo et al. 2021 (FedPara), https://arxiv.org/abs/2108.06098. Update rule:
W' = W0 + (alpha / r) (B1 A1) * (B2 A2) (elementwise), B_i [out, r], A_i [r, in]; the Hadamard product of
two rank-r matrices has rank up to r^2 for 2r(in + out) parameters per layer, twice LoRA's.

Defaults: r=8, alpha=8 (PEFT's and LyCORIS's: scale 1; r=8 gives rank up to 64 at the parameter cost of a
rank-16 LoRA), every attention and MLP linear as `lora`. B1 ~ N, B2 = 0 at init, so the model starts
unchanged. Merges exactly.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import MethodOptions, register


class LoHaOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of each of the two factors.")
    alpha: float = Field(8.0, gt=0, description="Scale numerator: the update is (alpha/r) (B1 A1) * (B2 A2).")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout of rank components during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of disabling a whole adapted "
                                                                      "module for a step (training only).")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")


@register("loha", paper="https://arxiv.org/abs/2108.06098")
class LoHa(PeftMethod):
    """Hadamard product of two low-rank updates: W' = W0 + s (B1 A1) * (B2 A2)."""
    trains = "two low-rank pairs combined by a Hadamard product"

    Config = LoHaOptions

    def peft_config(self):
        from peft import LoHaConfig

        c = self.config
        return LoHaConfig(r=c.r, alpha=c.alpha, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout,
                          target_modules=c.target_modules, task_type="CAUSAL_LM")
