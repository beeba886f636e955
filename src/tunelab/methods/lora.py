"""LoRA: low-rank adapters on frozen weights, through HF PEFT.

Hu et al. 2021, https://arxiv.org/abs/2106.09685. Update rule: W' = W0 + (alpha / r) * B @ A with
A [r, in] (Kaiming-uniform init), B [out, r] (zero init), only A and B train. rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead, which keeps
the update's size stable as r grows.

Defaults: r=16, alpha=32 on every linear of attention and MLP (q,k,v,o,gate,up,down): all-linear
targeting is what QLoRA found necessary to match full fine-tuning; alpha = 2r is the common choice.
The trained adapter saves in PEFT's own format, so `peft.PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field

from tunelab.core.deferred import bitsandbytes_loaded
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register
from tunelab.model import model_head

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRAOptions(MethodOptions):
    r: int = Field(16, ge=1, description="Rank of the update.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha/r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Module names (suffixes) to adapt, or 'all-linear'.",
    )
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r, which "
                                            "keeps its size stable as r grows (https://arxiv.org/abs/2312.03732).")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained fully (e.g. lm_head).")


def lora_peft_config(opts: LoRAOptions, **extra):
    from peft import LoraConfig

    return LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=opts.target_modules,
        use_rslora=opts.rslora,
        modules_to_save=opts.modules_to_save or None,
        task_type="CAUSAL_LM",
        **extra,
    )


@contextmanager
def no_bnb_dispatch() -> Iterator[None]:
    """PEFT adding adapter layers without importing bitsandbytes when no model can hold its layers.

    PEFT's dispatch (peft/tuners/*/model.py) imports bitsandbytes whenever it is installed, to test each layer
    against its quantised classes; a model holds such layers only once bitsandbytes has been imported to build
    them (`core/deferred.bitsandbytes_loaded`). Until then PEFT's availability checks read False while the
    adapter is added: the isinstance tests they guard could not match, and start-up saves the import (seconds,
    core/deferred.py). With bitsandbytes loaded (a bitsandbytes-quantised base) nothing changes."""
    if bitsandbytes_loaded():
        yield
        return
    checks = ("is_bnb_available", "is_bnb_4bit_available")
    saved = [(module, name, getattr(module, name)) for key, module in list(sys.modules.items())
             if key.startswith("peft.tuners.") and module is not None for name in checks if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, lambda: False)
    try:
        yield
    finally:
        for module, name, check in saved:
            setattr(module, name, check)


def wrap_peft(model, config):
    """`peft.get_peft_model` with PEFT's task type for the model's head (`tunelab.model.model_head`): SEQ_CLS for a
    reward model, which makes PEFT train its scalar `score` head fully (`modules_to_save`, saved with the adapter
    and folded in by merge_and_unload), CAUSAL_LM otherwise. Every PEFT-backed method wraps through here."""
    from peft import get_peft_model

    config.task_type = "SEQ_CLS" if model_head(model) == "sequence_classification" else "CAUSAL_LM"
    with no_bnb_dispatch():
        return get_peft_model(model, config)


class PeftAdapterMethod(Method):
    """Shared behaviour of methods implemented by a PEFT config: wrap, merge, save."""

    capabilities = Capabilities(is_adapter=True)
    adapter_format = "peft"

    def peft_config(self):
        raise NotImplementedError

    def prepare(self, model):
        return wrap_peft(model, self.peft_config())

    def merged_model(self, model):
        # merge_and_unload folds B@A*scale into W0 and returns the plain transformers model.
        return model.merge_and_unload()

    def save_adapter(self, model, directory: str) -> None:
        model.save_pretrained(directory, safe_serialization=True)


@register("lora", paper="https://arxiv.org/abs/2106.09685")
class LoRA(PeftAdapterMethod):
    trains = "low-rank A, B on the attention and MLP linears"
    Config = LoRAOptions
    capabilities = Capabilities(is_adapter=True, supports_sharding=True)  # tests/train/test_sharded_methods.py

    def peft_config(self):
        return lora_peft_config(self.config)
