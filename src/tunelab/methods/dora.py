"""DoRA: weight-decomposed low-rank adaptation, through HF PEFT (`LoraConfig(use_dora=True)`).

Liu et al. 2024, https://arxiv.org/abs/2402.09353. Update rule: W' = m * (W0 + s B A) / ||W0 + s B A||_col,
with the magnitude m [out] initialised to the column norms of W0 and trained with A [r, in], B [out, r].

Defaults: those of `lora` (r=16, alpha=32, every attention and MLP linear), the setting the paper compares
LoRA and DoRA at; the only extra parameters are the magnitudes (one per output feature of each adapted
linear). Merges exactly (m, the direction and B A fold into one matrix); the adapter is PEFT's own format.
"""

from __future__ import annotations

from tunelab.methods._peft_common import PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions
from tunelab.methods.registry import register


@register("dora", paper="https://arxiv.org/abs/2402.09353")
class DoRA(PeftMethod):
    """LoRA with a learned per-column magnitude: W' = m * (W0 + sBA) / ||W0 + sBA||_col."""
    trains = "LoRA A, B plus a per-column magnitude m"

    Config = LoRAOptions

    def peft_config(self):
        return lora_init_config(self.config, True, use_dora=True)
