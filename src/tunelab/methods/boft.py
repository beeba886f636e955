"""BOFT: orthogonal fine-tuning with butterfly factorisation, through HF PEFT (`BOFTConfig`).

Liu et al. 2023, https://arxiv.org/abs/2311.06243. Update rule: W' = diag(s) W0 R with R = B_m ... B_1 [in, in]
a product of m butterfly-permuted block-diagonal orthogonal matrices (blocks b x b, Cayley transform of
skew-symmetric parameters), s [out] a learned output scale; m factors reach a dense R with O(m in b) parameters.

Defaults: block size b=4 (PEFT's) and m=1 butterfly factor: m > 1 needs PEFT's `fbd_cuda` extension,
compiled with ninja at first use, and PEFT silently falls back to m=1 without it, so m=1 gives the same
model (and parameter count) on every machine; raise `n_butterfly_factor` on CUDA machines that build it.
Every attention and MLP linear as `lora`. R = I and s = 1 at init, so the model starts unchanged. Merges exactly.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, MethodOptions, register


class BOFTOptions(MethodOptions):
    block_size: int = Field(4, ge=2, description="Size b of each orthogonal block (must divide in_features).")
    n_butterfly_factor: int = Field(1, ge=1, description="Number m of butterfly factors (m > 1 needs CUDA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Multiplicative dropout of whole blocks.")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")


@register("boft", paper="https://arxiv.org/abs/2311.06243")
class BOFT(PeftMethod):
    """Butterfly-factored orthogonal rotation of each layer's input plus an output scale."""
    trains = "butterfly-factored orthogonal rotations plus an output scale"
    # `train.compile: auto` leaves BOFT eager: inductor spends ~30x LoRA's time on its butterfly products (first step
    # 1392 s vs 38-44 s for AdaLoRA / asymmetric LoRA, and again at the first new length, on the loaded 2-core
    # machine, docs/engine.md), more than a run of this size gains back
    capabilities = Capabilities(is_adapter=True, supports_sharding=True, eager_by_default=True)

    Config = BOFTOptions

    def peft_config(self):
        from peft import BOFTConfig

        c = self.config
        return BOFTConfig(boft_block_size=c.block_size, boft_n_butterfly_factor=c.n_butterfly_factor,
                          boft_dropout=c.dropout, target_modules=c.target_modules, task_type="CAUSAL_LM")
