"""An unsharded twin of a model, for export after sharded training.

Sharding backends (FSDP2, ZeRO-3) replace a model's parameters by shards, so after training no process holds
a model that PEFT's `save_pretrained` or a merge can run on. Before sharding, `meta_skeleton(model)` copies
the module tree (PEFT wrappers, configs, tied weights) with every parameter on the `meta` device: no memory.
After training, `materialize(skeleton, full_state)` gives those parameters the gathered full tensors, so the
skeleton becomes the trained model, unsharded, on one process. Buffers (rotary tables, masks) are copied
as they are: they are small and not in a state dict when non-persistent.
"""

from __future__ import annotations

import copy

import torch


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters are meta tensors (same shape, dtype, requires_grad, tying)."""
    memo: dict[int, object] = {}
    for p in model.parameters():  # shared (tied) parameters appear once: the copy shares them the same way
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def materialize(skeleton: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Give the skeleton's parameters the tensors of `full_state` (the model's full state dict, names as in
    `skeleton.state_dict()`); every parameter must be there. Tied parameters end up shared again."""
    names = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
    missing = sorted(names - full_state.keys())
    if missing:
        raise KeyError(f"the gathered state lacks parameters of the model: {missing[:5]}")
    skeleton.load_state_dict(full_state, strict=False, assign=True)
    # assign=True gives every name its own tensor; put shared parameters (tied embeddings) back together
    tie = getattr(skeleton, "tie_weights", None)
    if callable(tie):
        tie()
    return skeleton
