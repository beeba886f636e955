"""OLoRA: LoRA initialised from the QR decomposition of W, through HF PEFT (`init_lora_weights="olora"`).

Buyukakyuz 2024, https://arxiv.org/abs/2406.01775. Update rule: W = Q R, B0 = Q[:, :r] [out, r] (orthonormal),
A0 = R[:r] [r, in]; W_res = W - s B0 A0 stays frozen and W' = W_res + s B A trains.

Defaults: r=16, alpha=16 (scale 1, so B0 A0 is exactly the first r columns of the QR factorisation);
every attention and MLP linear like `lora`. The base weights change, so the exported adapter is CONVERTED
to a plain rank-2r LoRA (dW = s [B | -B0] [A ; A0]) that loads on the original base.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions
from tunelab.methods.registry import register


class OLoRAOptions(LoRAOptions):
    alpha: float = Field(16.0, gt=0, description="Scale numerator; alpha = r keeps the QR part unscaled.")


@register("olora", paper="https://arxiv.org/abs/2406.01775")
class OLoRA(PeftMethod):
    """LoRA on an orthonormal (QR) basis of W; the residual stays frozen."""
    trains = "LoRA A, B initialised from a QR basis of W (residual frozen)"

    Config = OLoRAOptions
    mutates_base = True

    def peft_config(self):
        return lora_init_config(self.config, "olora")
