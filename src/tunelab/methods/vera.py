"""VeRA: vector-based random matrix adaptation, through HF PEFT (`VeraConfig`).

Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454. Update rule: W' = W0 + diag(b) B diag(d) A with
A [r, in] and B [out, r] random, frozen and shared by all layers (sliced to each layer's shape); only
the scaling vectors b [out] (init 0) and d [r] (init d_initial) train.

Defaults: r=256 (PEFT's; far above LoRA ranks is cheap: the trainable count grows by one scalar per
rank and layer), d_initial=0.1 (small values, <= 0.1, work best in the paper's ablation), every
attention and MLP linear as `lora`; the projections come from a fixed PRNG key and are SAVED with the
adapter (save_projection), so it loads bit-exactly without regenerating them. Merges exactly.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import MethodOptions, register


class VeRAOptions(MethodOptions):
    r: int = Field(256, ge=1, description="Rank of the shared random projections.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the d vectors.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")
    projection_prng_key: int = Field(0, description="Seed of the shared random A and B.")


@register("vera", paper="https://arxiv.org/abs/2310.11454")
class VeRA(PeftMethod):
    """Frozen shared random A, B; trains only the vectors b and d: W' = W0 + diag(b) B diag(d) A."""
    trains = "scaling vectors b, d around frozen shared random A, B"

    Config = VeRAOptions

    def peft_config(self):
        from peft import VeraConfig

        c = self.config
        return VeraConfig(r=c.r, d_initial=c.d_initial, vera_dropout=c.dropout, target_modules=c.target_modules,
                          projection_prng_key=c.projection_prng_key, save_projection=True, task_type="CAUSAL_LM")
