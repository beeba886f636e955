"""LoRA-GA: LoRA initialised to align with the full gradient, through HF PEFT (`preprocess_loraga`).

Wang et al. 2024, https://arxiv.org/abs/2407.05000. Update rule: G = mean dL/dW over calibration batches
[out, in], G = U S V^T; A0 = V[:, :r]^T [r, in], B0 = U[:, r:2r] S_{r:2r} [out, r] (times out^1/4 / gamma^1/2,
"stable"); W_res = W - s B0 A0 frozen, so the model starts unchanged and its first update follows the
full gradient's principal directions.

Defaults: r=16, alpha=32 as `lora`; PEFT's (the paper's) ArB2r split and stable scaling with gamma=16;
8 calibration batches, passed by the runner with `calibrate(model, batches)` before `prepare`; the
gradient is that of the model's own mean-token cross-entropy on them. The base weights change, so the
exported adapter is converted to a plain rank-2r LoRA that loads on the original base (like PiSSA).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods._peft_common import CalibrationOptions, PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions, wrap_peft
from tunelab.methods.registry import Capabilities, register


class LoRAGAOptions(LoRAOptions, CalibrationOptions):
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = Field(
        "ArB2r", description="Which singular vectors of G go to A and B (ArB2r: A the first r, B the next r).")
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = Field("stable", description="Scaling of B0, A0.")
    stable_gamma: int = Field(16, ge=1, description="gamma of the stable scaling.")


@register("lora_ga", paper="https://arxiv.org/abs/2407.05000")
class LoRAGA(PeftMethod):
    """LoRA initialised from the SVD of the full gradient on calibration batches."""
    trains = "LoRA A, B initialised from the SVD of the full gradient (calibration)"

    Config = LoRAGAOptions
    capabilities = Capabilities(is_adapter=True, needs_calibration=True, supports_sharding=True)
    mutates_base = True

    def peft_config(self):
        from peft import LoraGAConfig

        c = self.config
        ga = LoraGAConfig(direction=c.direction, scale=c.scale, stable_gamma=c.stable_gamma)
        return lora_init_config(c, "lora_ga", lora_ga_config=ga)

    def wrap(self, model):
        from peft import preprocess_loraga

        batches = self._calibration_on(model)
        config = self.peft_config()

        def train_step():  # accumulates dL/dW on the targeted weights only; PEFT averages over the batches
            for b in batches:
                model(**b).loss.backward()

        preprocess_loraga(model, config, train_step=train_step)
        return wrap_peft(model, config)
