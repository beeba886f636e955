"""Shared machinery of the PEFT-backed methods (one registered method per file in this package).

Three things several PEFT methods need beyond `PeftAdapterMethod` (wrap, merge, save):

1. Calibration data. CorDA, EVA and LoRA-GA initialise from a few batches of the training data
   (input covariances, activation SVD, full gradients). `Method.prepare` only gets the model, so such a
   method declares `Capabilities(needs_calibration=True)` and `tunelab.assemble` calls, BEFORE `prepare`:

       method.calibrate(model, batches)   # batches: the first `method.n_calibration_batches` collated
                                          # training batches (dicts of input_ids/attention_mask/labels [B, T])

   `prepare` raises `CalibrationMissing` if it was not called. The batches must be the same on every
   process (the initialisation must be identical across data-parallel replicas).
2. Initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoRA-GA: W_res = W - s * B0 @ A0).
   Their raw adapter only works on W_res, so `prepare` keeps the initial adapter (B0, A0) and
   `save_adapter` converts with PEFT's `path_initial_model_for_weight_conversion`:
   dW = s * (B @ A - B0 @ A0) = s * [B | -B0] @ [A ; A0], a plain LoRA of rank 2r that loads on the
   ORIGINAL base. The merged export needs nothing special (W_res + s * B @ A is the trained weight).
3. Prompt learning (prompt tuning, P-tuning) prepends virtual tokens, so PEFT's logits are
   [B, n_virtual + T, V]; a forward hook drops the virtual positions so objectives see [B, T, V] logits
   aligned with their labels. Such methods cannot merge (`ExportUnsupported`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from tunelab.methods.lora import LoRAOptions, PeftAdapterMethod, wrap_peft
from tunelab.methods.registry import Capabilities, ExportUnsupported, MethodOptions

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # what calibration passes to the model


class CalibrationMissing(RuntimeError):
    """A data-dependent initialisation was prepared without `calibrate(model, batches)`."""


class CalibrationOptions(MethodOptions):
    calibration_batches: int = Field(8, ge=1, description="Training batches the initialisation looks at.")


class PeftMethod(PeftAdapterMethod):
    """A PEFT-backed method, plus calibration data and conversion of base-mutating initialisations."""

    capabilities = Capabilities(is_adapter=True, supports_sharding=True)  # tests/train/test_sharded_methods.py
    mutates_base: ClassVar[bool] = False  # the init subtracts B0 @ A0 from W: export converts to plain LoRA

    def __init__(self, config=None):
        super().__init__(config)
        self.calibration_batches: list[dict[str, torch.Tensor]] | None = None
        self._initial_adapter: dict[str, torch.Tensor] | None = None

    # -- calibration ------------------------------------------------------------------------------
    @property
    def n_calibration_batches(self) -> int:  # the `calibration_batches` option (CalibrationOptions)
        return int(getattr(self.config, "calibration_batches", 0))

    def calibrate(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """Keep `batches` (collated training batches) for the data-dependent init run by `prepare`."""
        if not batches or any("input_ids" not in b for b in batches):
            raise ValueError(f"method {self.name!r}: calibrate() needs batches with input_ids [B, T] "
                             f"(and attention_mask, labels), got {[sorted(b) for b in batches][:1]}")
        self.calibration_batches = [{k: b[k] for k in MODEL_INPUTS if k in b} for b in batches]

    def _calibration_on(self, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        if self.calibration_batches is None:
            raise CalibrationMissing(
                f"method {self.name!r} initialises from data: call method.calibrate(model, batches) with a few "
                f"training batches before method.prepare(model)")
        device = next(model.parameters()).device
        return [{k: v.to(device) for k, v in b.items()} for b in self.calibration_batches]

    # -- wrap / save -----------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return wrap_peft(model, self.peft_config())

    def prepare(self, model):
        model = self.wrap(model)
        if self.mutates_base:
            from peft import get_peft_model_state_dict

            # B0, A0 as PEFT saves them (keys without the adapter name), for the export conversion; on CPU
            self._initial_adapter = {k: v.detach().to("cpu", copy=True).contiguous()
                                     for k, v in get_peft_model_state_dict(model).items()}
        return model

    def save_adapter(self, model, directory: str) -> None:
        if not self.mutates_base:
            model.save_pretrained(directory, safe_serialization=True)
            return
        if self._initial_adapter is None:
            raise ExportUnsupported(f"method {self.name!r}: the initial adapter is unknown (prepare() was not run "
                                    f"by this method object), so the adapter cannot be converted to plain LoRA")
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="tunelab-init-") as tmp:
            init_dir = Path(tmp) / "initial_adapter"  # PEFT loads it as an adapter named after the folder
            init_dir.mkdir()
            save_file(self._initial_adapter, str(init_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            # PEFT writes the config there (init_lora_weights=True), loads it, saves [A ; A0], [B | -B0], r -> 2r
            model.save_pretrained(directory, safe_serialization=True,
                                  path_initial_model_for_weight_conversion=str(init_dir))


def lora_init_config(opts: LoRAOptions, init: Any, **extra):
    """A PEFT LoraConfig from LoRA options with another `init_lora_weights`."""
    from tunelab.methods.lora import lora_peft_config

    return lora_peft_config(opts, init_lora_weights=init, **extra)


class PromptLearningMethod(PeftMethod):
    """Virtual tokens (prompt tuning, prefix tuning, P-tuning): no weight to merge them into."""

    # not sharded: FSDP2 meets the virtual-token embedding (a plain tensor) next to sharded weights
    capabilities = Capabilities(is_adapter=True)
    prepends_tokens: ClassVar[bool] = True  # False for prefix tuning (keys/values, not input positions)
    mergeable = False

    def prepare(self, model):
        model = super().prepare(model)
        if self.prepends_tokens:
            model.register_forward_hook(_drop_virtual_positions, with_kwargs=True)
        return model

    def merged_model(self, model):
        raise ExportUnsupported(
            f"method {self.name!r} learns virtual tokens (prompt embeddings or key/value prefixes) that every input "
            f"attends to; no weight of the model can hold them, so there is no merged model. Export the adapter "
            f"(export.adapter) instead.")


def _drop_virtual_positions(module, args, kwargs, output):
    """Forward hook: logits [B, n_virtual + T, V] -> [B, T, V], aligned with input_ids and labels."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    logits = getattr(output, "logits", None)
    if ids is None or logits is None:
        return output
    n = module.active_peft_config.num_virtual_tokens
    if logits.shape[1] == ids.shape[1] + n:
        output.logits = logits[:, n:]
    return output
