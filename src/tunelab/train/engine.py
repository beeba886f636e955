"""The training engine's switches, applied once to the prepared model: what makes a step fast and small.

`configure_engine(model, train_cfg, device)` is called by the runner right after `method.prepare` (and by
`tunelab continual` per stage). Each lever is a `train.*` recipe field and was measured on its own by
`benchmarks/train_throughput.py --ablate` (docs/engine.md has the figures):

* `frozen_dtype` / `frozen_cast` - frozen weights stored in the compute dtype (precision.py);
* `attention` - `auto` picks tunelab's CPU attention (train/attention.py) on CPU under bf16 and sdpa elsewhere
  (its gain is keeping only bf16 probabilities for backward; under fp32 sdpa's CPU flash kernel is the better one);
* `gradient_checkpointing` - recompute each layer in backward (memory for compute); under compile, the compiler
  recomputes inside the compiled layers instead (`compiled_layers`), and `activation_memory_budget` (default 1:
  keep everything) lets it keep a fraction of each compiled layer's activations and recompute the cheapest rest;
* `compile` - torch.compile of each decoder layer during the training steps (`compiled_layers`, used by
  the loop; "regional": one layer's code is compiled once and reused by all of them, so compile time does
  not grow with depth); `auto` (the default) compiles on CPU under the DDP backend (`resolve_compile`);
  the compiled code is cached on disk, and a compiler that is missing or fails means eager, with a warning;
* the CPU allocator: glibc keeps freed blocks (allocator.py), always on for CPU training.
The chunked cross-entropy (train/chunked_ce.py) lives in the SFT objective (`objective.chunk_size`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from tunelab.core.precision import resolve_precision
from tunelab.core.unwrap import unwrap_peft
from tunelab.recipe import TrainConfig
from tunelab.train.allocator import keep_freed_memory
from tunelab.train.precision import cast_frozen_linears, frozen_dtype_for

log = logging.getLogger(__name__)


def resolve_attention(choice: str, device: torch.device, precision: str = "bf16") -> str:
    """`auto`: tunelab's attention on CPU under bf16 (resolved precision), sdpa otherwise."""
    if choice != "auto":
        return choice
    return "tunelab" if device.type == "cpu" and precision == "bf16" else "sdpa"


def set_attention(model: torch.nn.Module, choice: str, device: torch.device, precision: str = "bf16") -> str | None:
    """Switch the HF model (under any PEFT wrapping) to `choice`; returns the implementation in use."""
    name = resolve_attention(choice, device, precision)
    if name == "tunelab":
        from tunelab.train.attention import register

        register()
    base = unwrap_peft(model)
    try:
        base.set_attn_implementation(name)
    except (ValueError, AttributeError, ImportError) as e:
        log.warning("attention %r not available for this model (%s); keeping %s", name, e,
                    getattr(getattr(base, "config", None), "_attn_implementation", "its default"))
        return getattr(getattr(base, "config", None), "_attn_implementation", None)
    return name


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (the ModuleList holding most of the parameters)."""
    best: torch.nn.ModuleList | None = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            if best is None or sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in best.parameters()):
                best = m
    return list(best) if best is not None else []


def resolve_compile(choice: bool | str, device: torch.device, sharded: bool = False, batch_kind: str = "sft",
                    method_eager: bool = False) -> bool:
    """`auto`: compile on CPU under a replicated (DDP) backend for the SFT family's batches, where it was measured
    to pay (docs/engine.md); not on GPUs (not measured here), nor under FSDP / DeepSpeed (their wrapped layers are
    not compiled here), nor for preference pairs or rollouts (not measured: their shapes change with every batch,
    and short runs pay the compilation without its return), nor for a method that declares `eager_by_default`
    (`method_eager`: BOFT). `true` compiles whatever the case."""
    if choice == "auto":
        return device.type == "cpu" and not sharded and batch_kind == "sft" and not method_eager
    return bool(choice)


def use_compile_cache() -> str:
    """Inductor's on-disk cache (compiled kernels, FX graphs, AOT autograd graphs) in tunelab's cache directory,
    so it outlives /tmp (torch's default): a later run, in any process, loads what an earlier one compiled
    instead of compiling again. A TORCHINDUCTOR_CACHE_DIR the user set is left as it is; torch's default is not
    (inductor writes its default into the environment the first time anything asks for the directory, as an
    import of torchao does, so an unset variable cannot be told apart from that). Returns the directory."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from tunelab.model import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool, tc: TrainConfig | None = None):
    """Regional torch.compile of each decoder layer for the training steps only, undone on exit.

    Generation (evaluation) then runs eagerly: its growing KV-cache shapes would recompile over and over.
    Shapes that vary between steps (padding to the longest) cost one more compilation, with dynamic sizes,
    then none; packed rows (`data.packing`) have one shape. nn.Module.compile only marks a layer: compilation
    happens at its first call, so a compiler failure THEN (no C++ compiler, an unsupported operator) is also
    caught: dynamo's `suppress_errors` runs the failing frame eagerly (with its warning in the log) while the
    layers are compiled, and training goes on.

    `tc.activation_memory_budget` (default TrainConfig()'s) is AOTAutograd's budget while the layers are compiled:
    the fraction of each layer's activations kept for backward, the rest recomputed, cheapest first (min-cut);
    `gradient_checkpointing` makes it 0.
    """
    tc = tc if tc is not None else TrainConfig()
    layers = decoder_layers(model) if enabled else []
    try:
        if layers:
            use_compile_cache()
        for layer in layers:
            layer.compile()
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eagerly
        log.warning("torch.compile unavailable (%s: %s); training without it", type(e).__name__, e)
        layers = []
    # `train.gradient_checkpointing` under compile: transformers' checkpoint wrapper around a compiled layer breaks
    # the graph (dynamo refuses its context-variable side effect) and the layer runs eagerly, recomputing; instead the
    # compiler recomputes: AOTAutograd's activation memory budget 0 saves only what the layer's backward cannot
    # recompute (its inputs), the same memory as checkpointing with the recompute fused (LIMA 512: docs/engine.md)
    recompute = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    try:
        if layers:
            import torch._dynamo
            import torch._functorch.config

            for layer in recompute:
                setattr(layer, "gradient_checkpointing", False)  # (mypy: Module.__setattr__ takes tensors, modules)
            budget = 0.0 if recompute else tc.activation_memory_budget
            with torch._dynamo.config.patch(suppress_errors=True), \
                    torch._functorch.config.patch(activation_memory_budget=budget):
                yield len(layers)
        else:
            yield 0
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # back to eager (nn.Module.compile's own attribute)
        for layer in recompute:
            setattr(layer, "gradient_checkpointing", True)


def configure_engine(model: torch.nn.Module, tc: TrainConfig, device: torch.device, *,
                     cast_frozen: bool = True) -> dict[str, object]:
    """Apply the engine's switches to a prepared model; returns what was applied (for the run's log).

    cast_frozen=False keeps frozen weights in their dtype: `tunelab continual` passes it for methods that
    train the weights themselves, since a later stage may train what is frozen now (HFT)."""
    applied: dict[str, object] = {}
    precision = resolve_precision(tc.precision, device)  # the runner passes it resolved; direct callers may not
    if device.type == "cpu":
        applied["cpu_allocator_keeps_freed"] = keep_freed_memory()
    applied["frozen_params_cast"] = cast_frozen_linears(
        model, frozen_dtype_for(tc.frozen_dtype, precision), everything=tc.frozen_cast == "all") if cast_frozen else 0
    applied["attention"] = set_attention(model, tc.attention, device, precision)
    if tc.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen inputs (adapters) without enable_input_require_grads
        hf_model: Any = model  # a transformers PreTrainedModel (or PeftModel) under nn.Module's type
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied["gradient_checkpointing"] = True
    return applied
