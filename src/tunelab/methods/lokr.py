"""LoKr: low-rank Kronecker-product adaptation (LyCORIS), through HF PEFT (`LoKrConfig`).

Yeh et al. 2023, https://arxiv.org/abs/2309.14859. Update rule: W' = W0 + (alpha / r) W1 (x) W2 (Kronecker),
with out = a * b and in = c * d factored near their square roots, W1 [a, c] full and W2 [b, d] full, or
B2 A2 of rank r when r < max(b, d) / 2 (so a 64x64 matrix costs 8*8 + 8*8 = 128 parameters).

Defaults: r=8, alpha=8 (PEFT's and LyCORIS's: scale 1), decompose_factor=-1 (factors as close to square
as possible), every attention and MLP linear as `lora`. W2 (or B2) starts at zero, so the model starts
unchanged. Merges exactly.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import MethodOptions, register


class LoKrOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of W2's factors (used when r < max(b, d) / 2).")
    alpha: float = Field(8.0, gt=0, description="Scale numerator: the update is (alpha/r) W1 (x) W2.")
    decompose_both: bool = Field(False, description="Also factor W1 as a rank-r product.")
    decompose_factor: int = Field(-1, description="Kronecker factor of the dimensions (-1: near square).")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout of rank components during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of disabling a whole adapted "
                                                                      "module for a step (training only).")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")


@register("lokr", paper="https://arxiv.org/abs/2309.14859")
class LoKr(PeftMethod):
    """Kronecker product update: W' = W0 + s W1 (x) W2."""
    trains = "Kronecker factors W1, W2 of the update"

    Config = LoKrOptions

    def peft_config(self):
        from peft import LoKrConfig

        c = self.config
        return LoKrConfig(r=c.r, alpha=c.alpha, decompose_both=c.decompose_both,
                          decompose_factor=c.decompose_factor, rank_dropout=c.rank_dropout,
                          module_dropout=c.module_dropout, target_modules=c.target_modules, task_type="CAUSAL_LM")
