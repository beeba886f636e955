"""Freeze tuning: train only the listed modules or layers, keep the rest of the model frozen.

Lee et al. 2019, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning"
(https://arxiv.org/abs/1911.03090) show that training only the top layers keeps most of the gain.
Update rule: W <- AdamW(W, dL/dW) for W in the selected set; every other W stays fixed.

Selection: `layers` picks decoder layers by index (negative = from the top, so the default [-2, -1]
trains the last two), `modules` picks parameters whose name contains any of the given substrings
(e.g. "lm_head", "embed_tokens", "mlp"). Both may be given; a parameter trains if either selects it.
"""

from __future__ import annotations

import re

from pydantic import Field

from tunelab.methods.registry import Capabilities, Method, MethodOptions, register

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def num_layers(model) -> int:
    return int(getattr(model.config, "num_hidden_layers"))


def layer_index(param_name: str) -> int | None:
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


@register("freeze", paper="https://arxiv.org/abs/1911.03090")
class Freeze(Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "the chosen decoder layers / modules (default: the last two layers)"
    class Config(MethodOptions):
        layers: list[int] = Field(default_factory=lambda: [-2, -1], description="Decoder layer indices to train.")
        modules: list[str] = Field(default_factory=list, description="Name substrings of extra parameters to train.")

    def prepare(self, model):
        n = num_layers(model)
        selected = set()
        for i in self.config.layers:
            if not -n <= i < n:
                raise ValueError(f"method.layers: layer {i} out of range for a model of {n} layers")
            selected.add(i % n)
        any_trainable = False
        for name, p in model.named_parameters():
            idx = layer_index(name)
            train = (idx is not None and idx in selected) or any(s in name for s in self.config.modules)
            p.requires_grad_(train)
            any_trainable |= train
        if not any_trainable:
            raise ValueError("method freeze: the selection matches no parameter")
        return model
