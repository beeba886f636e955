"""Full fine-tuning: every parameter of the model trains.

The baseline every other method is measured against (Howard & Ruder 2018 popularised it for LMs:
https://arxiv.org/abs/1801.06146). Update rule: W <- AdamW(W, dL/dW) for all W.
"""

from __future__ import annotations

from tunelab.methods.registry import Capabilities, Method, MethodOptions, register


@register("full", paper="https://arxiv.org/abs/1801.06146")
class Full(Method):
    trains = "every parameter"
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py

    class Config(MethodOptions):
        pass

    def prepare(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
