"""PiSSA: LoRA initialised with the principal singular components of W, through HF PEFT.

Meng et al. 2024, https://arxiv.org/abs/2404.02948. Update rule: W = U S V^T,
B0 = U_r (S_r/s)^1/2 [out, r], A0 = (S_r/s)^1/2 V_r^T [r, in]; W_res = W - s B0 A0 stays frozen and
W' = W_res + s B A trains the principal part.

Defaults: r=16, alpha=16 (scale 1, the paper's setting: the adapter starts as exactly the top-r
components); exact SVD (`niter: null`), which is deterministic, so a resumed run rebuilds the same W_res,
and takes seconds per matrix up to ~1B parameters; set `niter` (the paper's fast SVD, e.g. 16) for large
models. The base weights change, so the exported adapter is CONVERTED to a plain rank-2r LoRA
(dW = s [B | -B0] [A ; A0]) that loads on the original base; the merged export is W_res + s B A.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions
from tunelab.methods.registry import register


class PiSSAOptions(LoRAOptions):
    alpha: float = Field(16.0, gt=0, description="Scale numerator; alpha = r keeps the principal part unscaled.")
    niter: int | None = Field(None, ge=1, description="Randomised-SVD iterations (fast SVD); null = exact SVD.")


@register("pissa", paper="https://arxiv.org/abs/2404.02948")
class PiSSA(PeftMethod):
    """LoRA on the top-r singular components of W; the residual W - s B0 A0 stays frozen."""
    trains = "LoRA A, B initialised from W's top-r singular components (residual frozen)"

    Config = PiSSAOptions
    mutates_base = True

    def peft_config(self):
        init = "pissa" if self.config.niter is None else f"pissa_niter_{self.config.niter}"
        return lora_init_config(self.config, init)
