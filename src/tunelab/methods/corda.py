"""CorDA: context-oriented decomposition adaptation, through HF PEFT (`preprocess_corda`, init "corda").

Yang et al. 2024, https://arxiv.org/abs/2406.05223. Update rule: C [in, in] = mean over calibration sequences
of X^T X (X [T, in] the linear's input, damped to be invertible); W C = U S V^T, so W = U S (V^T C^-1);
B0, A0 from the r largest (IPM) or smallest (KPM) components, W_res = W - s B0 A0 frozen, W' = W_res + s B A.

Defaults: r=16, alpha=16 (scale 1: the adapter starts as exactly the chosen components); `ipm`
("instruction-previewed": adapt the components the task's inputs use most, the paper's mode for the best
fine-tuning result; `kpm` keeps world knowledge instead); 8 calibration batches of the training data,
which the runner passes with `calibrate(model, batches)` before `prepare` (see _peft_common). The base
weights change, so the exported adapter is converted to a plain rank-2r LoRA that loads on the original base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods._peft_common import CalibrationOptions, PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions, wrap_peft
from tunelab.methods.registry import Capabilities, register


class CorDAOptions(LoRAOptions, CalibrationOptions):
    alpha: float = Field(16.0, gt=0, description="Scale numerator; alpha = r keeps the components unscaled.")
    mode: Literal["ipm", "kpm"] = Field("ipm", description="ipm: adapt the largest components of W C; "
                                                           "kpm: the smallest (preserves knowledge).")


@register("corda", paper="https://arxiv.org/abs/2406.05223")
class CorDA(PeftMethod):
    """LoRA initialised from the SVD of W times the input covariance (calibration batches)."""
    trains = "LoRA A, B initialised from the SVD of W x input covariance (calibration)"

    Config = CorDAOptions
    capabilities = Capabilities(is_adapter=True, needs_calibration=True, supports_sharding=True)
    mutates_base = True

    def peft_config(self):
        from peft.tuners.lora.config import CordaConfig

        return lora_init_config(self.config, "corda", corda_config=CordaConfig(corda_method=self.config.mode))

    def wrap(self, model):
        import torch
        from peft.tuners.lora.corda import preprocess_corda

        batches = self._calibration_on(model)
        config = self.peft_config()

        @torch.no_grad()
        def run_model():  # PEFT's covariance hook takes one sequence per forward: X [T, in], padding dropped
            for b in batches:
                mask = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
                for ids, keep in zip(b["input_ids"], mask):
                    model(input_ids=ids[keep].unsqueeze(0))

        was_training = model.training
        model.eval()
        preprocess_corda(model, config, run_model=run_model)
        model.train(was_training)
        return wrap_peft(model, config)
