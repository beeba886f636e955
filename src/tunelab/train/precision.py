"""Storage dtype of frozen weights.

Under bf16 autocast, `F.linear` casts an fp32 weight to bf16 on every call, and autocast's cast cache
only keeps casts of leaf tensors that require grad, so a frozen fp32 weight is copied to bf16 on every
forward. Storing frozen Linear weights in bf16 up front gives the same forward numerics (the matmul
sees the same bf16 values), removes those copies, and halves their memory. Only plain `nn.Linear`
weights that do not train are cast; embeddings, norms and a lm_head tied to the embeddings stay in
their dtype, because autocast would NOT cast them (the residual stream stays fp32).

`train.frozen_cast: all` casts every frozen floating parameter instead (embeddings, norms, a tied head):
the residual stream then runs in the compute dtype, as when a model is loaded in bf16 (Unsloth, most
LoRA recipes). It removes the per-layer fp32 <-> bf16 copies of the activations and the per-step bf16
copy of a frozen fp32 lm_head; results move by bf16 rounding (tests/train/test_engine.py states the
tolerance). `restore_frozen_weights` puts the original values back before a merged export.
"""

from __future__ import annotations

import torch

from tunelab.core.precision import AUTOCAST_DTYPES, DTYPES


def frozen_dtype_for(frozen_dtype: str, precision: str) -> torch.dtype | None:
    """`auto` follows the autocast precision (resolved: not `auto`); None means leave the weights as they are."""
    if frozen_dtype == "auto":
        return AUTOCAST_DTYPES[precision]
    return DTYPES[frozen_dtype]


def _tied_to_embeddings(model: torch.nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            ids.add(id(m.weight))
    return ids


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype | None, *, everything: bool = False) -> int:
    """Cast the weights of frozen nn.Linear modules to `dtype`; returns the number of parameters cast.

    everything=True: every frozen floating parameter that is a plain tensor (not a quantised subclass),
    embeddings and norms included (`train.frozen_cast: all`).
    """
    if dtype is None:
        return 0
    if everything:
        n = 0
        for p in model.parameters():
            if (not p.requires_grad and p.is_floating_point() and type(p.data) is torch.Tensor
                    and p.dtype != dtype):
                p.data = p.data.to(dtype)
                n += p.numel()
        return n  # frozen Linear weights and biases are frozen parameters too: nothing is left to cast
    tied = _tied_to_embeddings(model)
    n = 0
    for m in model.modules():
        # type(...) is torch.Tensor: leave quantised tensor subclasses (QLoRA's NF4) alone
        if (type(m) is torch.nn.Linear and not m.weight.requires_grad and id(m.weight) not in tied
                and type(m.weight.data) is torch.Tensor):
            if m.weight.dtype != dtype:
                m.weight.data = m.weight.data.to(dtype)
                if m.bias is not None and not m.bias.requires_grad:
                    m.bias.data = m.bias.data.to(dtype)
                n += m.weight.numel()
    return n


def upcast_linears(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Undo `cast_frozen_linears` before merging, so a merged export is computed in full precision."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype != dtype and m.weight.is_floating_point():
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)


def restore_frozen_weights(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> int:
    """Put the base model's original full-precision values back into parameters that were cast.

    `original` is the base model's state dict; names are matched after removing PEFT's wrapping
    (`base_model.model.` prefix, `.base_layer` segment). Only parameters whose dtype differs from the
    original (the cast ones) are touched. Returns the number of tensors restored.
    """
    n = 0
    for name, p in model.named_parameters():
        if type(p.data) is not torch.Tensor:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        src = original.get(key)
        if src is not None and p.dtype != src.dtype and src.shape == p.shape:
            p.data = src.detach().to(p.device).clone()
            n += 1
    return n

