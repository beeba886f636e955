"""EVA: explained-variance adaptation, through HF PEFT (`init_lora_weights="eva"`, `initialize_lora_eva_weights`).

Paischer et al. 2024, https://arxiv.org/abs/2410.07170. Update rule: A0 = the top right-singular vectors
of each linear's input activations X [tokens, in] (incremental SVD over calibration batches), B0 = 0, so
W' = W0 + s B A starts unchanged; with rho > 1 the rank budget (r per layer) is redistributed to the
layers whose components explain the most variance.

Defaults: r=16, alpha=32 as `lora`; rho=2 and tau=0.99 (PEFT's EvaConfig defaults: a layer may get up
to 2r, components count as converged when successive estimates have cosine similarity >= 0.99);
activations only at tokens that carry loss (labels != -100); 8 calibration batches, passed by the
runner with `calibrate(model, batches)` before `prepare`. PEFT cycles over them until convergence: a
batch needs at least r * rho such tokens (smaller ones are dropped), and after `max_passes` passes the
init fails with a clear error instead of looping (32 tokens per batch for 32 components took 4,610
forwards on the tiny model, 64 tokens took 74). The base weights do not change: the adapter is plain
LoRA (with a rank pattern).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.methods._peft_common import CalibrationOptions, PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions, wrap_peft
from tunelab.methods.registry import Capabilities, register


class EVAOptions(LoRAOptions, CalibrationOptions):
    rho: float = Field(2.0, ge=1.0, description="Max rank per layer as a multiple of r (1 = no redistribution).")
    tau: float = Field(0.99, gt=0, le=1, description="Cosine-similarity threshold for converged components.")
    whiten: bool = Field(False, description="Whiten A0 (scale components by 1/singular value).")
    use_label_mask: bool = Field(True, description="Use only tokens that carry loss for the SVD.")
    max_passes: int = Field(100, ge=1, description="Passes over the calibration batches before giving up.")


@register("eva", paper="https://arxiv.org/abs/2410.07170")
class EVA(PeftMethod):
    """LoRA with A initialised to the principal directions of each layer's input activations."""
    trains = "LoRA A, B with A from the SVD of the layers' input activations (calibration)"

    Config = EVAOptions
    capabilities = Capabilities(is_adapter=True, needs_calibration=True, supports_sharding=True)

    def peft_config(self):
        from peft.tuners.lora.config import EvaConfig

        c = self.config
        eva = EvaConfig(rho=c.rho, tau=c.tau, whiten=c.whiten, use_label_mask=c.use_label_mask)
        return lora_init_config(c, "eva", eva_config=eva)

    def wrap(self, model):
        from peft import initialize_lora_eva_weights

        c = self.config
        components = round(c.r * c.rho)  # per layer: PEFT skips a batch with fewer tokens than this
        batches = [b for b in self._calibration_on(model) if self._svd_tokens(b) >= components]
        if not batches:
            raise ValueError(f"eva: no calibration batch has the {components} (r * rho) tokens an SVD step needs "
                             f"(tokens with labels != -100 when use_label_mask); use larger batches")
        limit = c.max_passes * len(batches)
        calls = [0]

        def forward(model, inputs):  # PEFT cycles over the batches until convergence: bound it
            calls[0] += 1
            if calls[0] > limit:
                raise RuntimeError(f"eva: components did not converge (tau={c.tau}) in {c.max_passes} passes over "
                                   f"{len(batches)} calibration batches; give more or larger batches, or lower tau")
            return model(**inputs)

        peft_model = wrap_peft(model, self.peft_config())
        # incremental SVD of every target's inputs until the top components converge; then B0 = 0, A0 = components
        initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
        return peft_model

    def _svd_tokens(self, batch) -> int:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        if self.config.use_label_mask and "labels" in batch:
            mask = mask & (batch["labels"] != -100)
        return int(mask.sum())
