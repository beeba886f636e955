"""HFT: half fine-tuning — a random half of the parameter blocks trains, the other half stays frozen.

Hui et al. 2024, https://arxiv.org/abs/2404.18466. Update rule: W <- AdamW(W, dL/dW) for W in a random
half S of the parameter matrices, chosen per category; W stays at its pretrained value outside S, which
is what preserves earlier knowledge (the paper reads S as a regulariser).

Selection "at the category level" (the paper's Fig. 2), as implemented here: the categories are, for
each decoder layer, its attention matrices (q/k/v/o), its MLP matrices (gate/up/down) and its norms, plus
one category for everything outside the layers (embeddings, final norm, untied LM head). In each
category a random half trains: 2 of the 4 attention matrices; for the 3 MLP matrices, 2 in a random half
of the layers and 1 in the other half, so that exactly half of all MLP matrices train (with an odd number
of layers, the odd one out is a fair coin). Checked: this is the per-layer rule an independent
reimplementation states (the SSU project's HFT baseline: attention 2 of 4; FFN 2 of 3 frozen in a random
half of the layers, 1 of 3 in the rest); the rule for embeddings, head and norms (here: half of each
category, the non-layer tensors one category) could not be checked against the paper's text here.

Defaults: one draw for the whole run (`switch_every: null`), as the paper draws one selection per
training stage; within one run the selection can be re-drawn every `switch_every` steps. The draw is a pure
function of (seed, period); the current selection is also saved in `state_dict()`. Optimizer state
across switches is handled as in LISA (`tunelab.methods.lisa.SwitchingSubset`): frozen blocks lose their
Adam state, newly unfrozen ones start fresh, blocks that stay keep theirs.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.methods.freeze import layer_index
from tunelab.methods.lisa import SwitchingSubset, period_generator
from tunelab.methods.registry import Capabilities, MethodOptions, register


def category(param_name: str) -> tuple:
    """The HFT category of a parameter: ("attn", i), ("mlp", i), ("norm", i) or ("model",)."""
    i = layer_index(param_name)
    if i is None:
        return ("model",)
    if ".self_attn." in param_name:
        return ("attn", i)
    if ".mlp." in param_name:
        return ("mlp", i)
    return ("norm", i)


@register("hft", paper="https://arxiv.org/abs/2404.18466")
class HFT(SwitchingSubset):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "a random half of the parameter blocks"
    class Config(MethodOptions):
        switch_every: int | None = Field(None, ge=1, description="Steps between re-draws; null = one draw.")
        seed: int = Field(0, description="Seed of the draws (draw p uses seed and p only).")

    def categories(self, model) -> dict[tuple, list[str]]:
        groups: dict[tuple, list[str]] = {}
        for name, _ in model.named_parameters():
            groups.setdefault(category(name), []).append(name)
        return groups

    def draw(self, model, period: int) -> set[str]:
        gen = period_generator(self.config.seed, period)
        cats = sorted(self.categories(model).items(), key=lambda kv: str(kv[0]))
        # odd-sized categories of one kind (the MLP's 3 matrices in every layer): ceil of half in a random half
        # of them, floor in the rest, so that exactly half of that kind trains (a coin for an odd one out)
        odd: dict[str, list[tuple]] = {}
        for key, names in cats:
            if len(names) % 2:
                odd.setdefault(key[0], []).append(key)
        ceil: set[tuple] = set()
        for _, keys in sorted(odd.items()):
            n_ceil = len(keys) // 2 + (int(torch.randint(0, 2, (1,), generator=gen)) if len(keys) % 2 else 0)
            ceil.update(keys[j] for j in torch.randperm(len(keys), generator=gen)[:n_ceil].tolist())
        active: set[str] = set()
        for key, names in cats:
            k = len(names) // 2 + (1 if key in ceil else 0)
            perm = torch.randperm(len(names), generator=gen)
            active.update(names[j] for j in perm[:k].tolist())
        return active

    def describe(self) -> str:
        return f"{len(self.active)} of {len(self._candidates)} parameter tensors"
