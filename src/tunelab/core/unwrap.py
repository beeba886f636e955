"""Reaching the model inside its wrappers: one implementation each, used everywhere.

Both return `Any`: an HF `PreTrainedModel` or a `PeftModel`, whose methods (`get_input_embeddings`,
`set_attn_implementation`, ...) the callers use; `nn.Module`'s typing would call them tensors."""

from __future__ import annotations

from typing import Any

import torch


def unwrap_model(model: torch.nn.Module) -> Any:
    """The model under process wrappers (DDP, accelerate, DeepSpeed's engine; torch.compile's `_orig_mod` is not
    one of these): anything with `.module` whose class has no `get_input_embeddings` (DeepSpeed's engine forwards
    unknown attributes to its module, so the class is asked, not the instance). A PEFT model is returned as it is."""
    while not hasattr(type(model), "get_input_embeddings") and isinstance(getattr(model, "module", None),
                                                                          torch.nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def unwrap_peft(model: torch.nn.Module) -> Any:
    """The HF ``*ForCausalLM`` inside a PEFT ``PeftModel`` (LoRA layers stay inside its modules); the model
    itself when it is no PeftModel."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model
