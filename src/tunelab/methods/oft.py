"""OFT: orthogonal fine-tuning, through HF PEFT (`OFTConfig`).

Qiu et al. 2023, https://arxiv.org/abs/2306.07280. Update rule: y = W0 (R x), i.e. W' = W0 R,
with R = blockdiag(R_1..R_k) [in, in] and each R_i = (I + S_i)(I - S_i)^-1 (Cayley transform of a
skew-symmetric S_i [b, b], b(b-1)/2 parameters); orthogonal R keeps the norms of and angles between W0's
neurons (hyperspherical energy).

Defaults: block size b=32 (PEFT's: in / 32 blocks per layer), the EXACT Cayley inverse (the paper's;
PEFT defaults to a 5-term Neumann series, which is faster but only orthogonal while ||S|| << 1: at a
large lr the rows' norms drift by ~20% on the tiny test model; `use_cayley_neumann: true` to opt in),
every attention and MLP linear as `lora`. S = 0 at init, so R = I and the model starts unchanged.
Merges exactly (W0 R is one matrix).
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import MethodOptions, register


class OFTOptions(MethodOptions):
    block_size: int = Field(32, ge=2, description="Size b of each orthogonal block (must divide in_features).")
    coft: bool = Field(False, description="Constrained OFT: keep R within eps of I.")
    eps: float = Field(6e-5, gt=0, description="COFT's radius.")
    block_share: bool = Field(False, description="One block shared by all blocks of a layer.")
    use_cayley_neumann: bool = Field(False, description="Neumann series instead of the exact inverse (faster, "
                                                        "approximately orthogonal).")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Multiplicative dropout: probability of setting "
                                                                      "an orthogonal block to the identity for a step.")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")


@register("oft", paper="https://arxiv.org/abs/2306.07280")
class OFT(PeftMethod):
    """A learned block-diagonal orthogonal rotation of each layer's input: y = W0 R x."""
    trains = "block-diagonal orthogonal rotations of each linear's input"

    Config = OFTOptions

    def peft_config(self):
        from peft import OFTConfig

        c = self.config
        return OFTConfig(r=0, oft_block_size=c.block_size, coft=c.coft, eps=c.eps, block_share=c.block_share,
                         use_cayley_neumann=c.use_cayley_neumann, module_dropout=c.module_dropout,
                         target_modules=c.target_modules, task_type="CAUSAL_LM")
