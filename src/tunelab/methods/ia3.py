"""IA3: infused adapter by inhibiting and amplifying inner activations, through HF PEFT (`IA3Config`).

Liu et al. 2022, https://arxiv.org/abs/2205.05638. Update rule: k' = l_k * k, v' = l_v * v (vectors over the
output features of k_proj, v_proj) and h' = W_down (l_ff * h) (a vector over down_proj's input features);
only the vectors l train, initialised to 1 so the model starts unchanged.

Defaults: the paper's placement, keys, values and the MLP's inner activation (k_proj, v_proj, down_proj
as the feed-forward module; Llama-family names: set both lists for other architectures): 2 kv_dim +
intermediate parameters per layer, with LN tuning the fewest here. Merges exactly (a row or column
scaling of W).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.registry import MethodOptions, register


class IA3Options(MethodOptions):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
                                      description="Linears whose activations are rescaled.")
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"],
                                           description="Targets scaled on their INPUT (the MLP's inner activation).")

    @model_validator(mode="after")
    def _ff_subset(self):
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforward_modules must be among target_modules; not targeted: {sorted(extra)}")
        return self


@register("ia3", paper="https://arxiv.org/abs/2205.05638")
class IA3(PeftMethod):
    """Learned rescaling vectors on keys, values and the MLP's inner activation."""
    trains = "scaling vectors on keys, values and the MLP's inner activation"

    Config = IA3Options

    def peft_config(self):
        from peft import IA3Config

        c = self.config
        return IA3Config(target_modules=c.target_modules, feedforward_modules=c.feedforward_modules,
                         task_type="CAUSAL_LM")
