"""LoRA+: LoRA with a larger learning rate for B than for A (optimizer groups; the adapter is PEFT LoRA).

Hayou et al. 2024, https://arxiv.org/abs/2402.12354. Update rule: W' = W0 + s B A, trained with
lr_A = lr and lr_B = lr_ratio * lr (for wide models, efficient feature learning needs B to move faster).

Defaults: lr_ratio=16 (2^4, the ratio the paper recommends as a starting point); the rest as `lora`
(r=16, alpha=32, every attention and MLP linear). `param_groups` marks B's group with `lr_scale`;
`build_optimizer` turns it into an absolute lr (train.lr * lr_ratio) and builds train.optimizer over the
groups, so the schedule (warmup, decay) scales both rates alike.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.methods._peft_common import PeftMethod, lora_init_config
from tunelab.methods.lora import LoRAOptions
from tunelab.methods.registry import register


class LoRAPlusOptions(LoRAOptions):
    lr_ratio: float = Field(16.0, gt=0, description="lr of B / lr of A.")


@register("loraplus", paper="https://arxiv.org/abs/2402.12354")
class LoRAPlus(PeftMethod):
    """LoRA whose B matrices learn lr_ratio times faster than A."""
    trains = "LoRA A, B with B at lr_ratio x the learning rate"

    Config = LoRAPlusOptions

    def peft_config(self):
        return lora_init_config(self.config, True)

    def param_groups(self, model, weight_decay):
        """A (and any other matrix): lr; B: lr * lr_ratio ("lr_scale"); 1-d parameters: no weight decay."""
        a, b, no_decay = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2:
                no_decay.append(p)
            elif "lora_B" in name:
                b.append(p)
            else:
                a.append(p)
        groups = [{"params": a, "weight_decay": weight_decay},
                  {"params": b, "weight_decay": weight_decay, "lr_scale": self.config.lr_ratio}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def build_optimizer(self, model, train_config):
        from tunelab.train.optim import build_optimizer

        groups = []
        for g in self.param_groups(model, train_config.weight_decay):
            g = dict(g)
            scale = g.pop("lr_scale", None)
            if scale is not None:
                g["lr"] = train_config.lr * scale
            groups.append(g)
        return build_optimizer(groups, train_config)
