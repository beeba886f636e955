"""FSDP2: parameters, gradients and optimizer state sharded across processes (`distributed.backend: fsdp`).

Zhao et al. 2023 (PyTorch FSDP, https://arxiv.org/abs/2304.11277); FSDP2 is the per-parameter DTensor
rewrite, `torch.distributed.fsdp.fully_shard`. Each parameter is split along dim 0 into one shard per process
(a DTensor); a layer's shards are all-gathered just before its forward (and again before its backward when
`reshard_after_forward`), and its gradients are reduce-scattered right after its backward, so a process holds
1/N of the parameters, gradients and AdamW state plus one layer's full weights at a time.

Applied directly, as torchtitan and torchtune do: `fully_shard` on every decoder layer (one all-gather per
layer), then on the transformers model itself (embeddings, final norm, lm_head: the root group).
accelerate 1.16 does not shard on CPU (its FSDP plugin falls back to DDP or to unsharded processes), so
accelerate / torchrun remain the launchers and the process group, and this backend shards.

What else differs from DDP (the loop and the runner ask the backend, never the backend's name):
* forward passes are collective (every process gathers each layer together), so EVERY process evaluates and
  generates, on the same data, in lockstep; the main process writes the results;
* gradients are reduce-scattered after every micro-batch (no `no_sync`: keeping unsharded gradients across
  micro-batches would cost the memory sharding saves); the sum over micro-batches is the same;
* clipping uses the global norm of the sharded gradients (a DTensor reduced across processes);
* checkpoints are sharded DCP checkpoints (train/dcp.py) that re-shard on resume;
* export gathers the full state onto the main process into an unsharded twin of the model (train/skeleton.py).
The root is the transformers model inside a PEFT wrapper, so `generate` (which PEFT calls on it directly)
and the adapter-disabled reference pass through the root's gathering hooks too.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tunelab.core.unwrap import unwrap_peft
from tunelab.recipe import FSDPConfig, Recipe, RecipeError
from tunelab.train import dcp
from tunelab.train.allocator import map_large_blocks, release_freed_memory
from tunelab.train.backends import Backend
from tunelab.train.engine import decoder_layers
from tunelab.train.skeleton import materialize, meta_skeleton

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 and DCP need a process group; a single process (no torchrun) gets a one-member one in memory."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: torch.nn.Module, config: FSDPConfig, device: torch.device) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the transformers model (under any PEFT wrapper); in place.

    Returns the root that was sharded. Activation checkpointing (`config.activation_checkpointing`) is the
    composable `checkpoint` per layer, applied first: unlike a wrapper module it keeps parameter names, so
    checkpoints and PEFT adapters are unaffected.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    root = unwrap_peft(model)
    layers = decoder_layers(root)
    if not layers:
        raise RecipeError("distributed.backend=fsdp: this model has no repeated decoder layers to shard")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward}
    if config.param_dtype or config.reduce_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=DTYPES[config.param_dtype] if config.param_dtype else None,
            reduce_dtype=DTYPES[config.reduce_dtype] if config.reduce_dtype else None)
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    if config.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in layers:
            checkpoint(layer)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # The root group (embeddings, final norm, lm_head) stays gathered from its forward to its backward: backward
    # needs it at once, and the chunked cross-entropy (train/chunked_ce.py) applies lm_head's weight AFTER the
    # model's forward, outside it, which needs the gathered (plain) weight rather than its shard.
    fully_shard(root, **{**kwargs, "reshard_after_forward": False})
    return root


class FSDPBackend(Backend):
    """FSDP2 over accelerate's process group (see the module docstring)."""

    name = "fsdp"
    sharded = True

    def __init__(self, accelerator: Any, recipe: Recipe | None = None):
        super().__init__(accelerator, recipe)
        if self.recipe.train.precision == "fp16":  # resolved: `auto` gives fp16 on GPUs without bf16
            raise RecipeError(f"recipe field 'train.precision': fp16 needs loss scaling, which distributed.backend="
                              f"{self.name} does not wire in yet; use bf16 (GPUs from Ampere on) or fp32, or ddp")
        self._skeleton: torch.nn.Module | None = None

    @classmethod
    def check(cls, recipe: Recipe) -> None:
        if recipe.distributed.fsdp.activation_checkpointing and recipe.train.gradient_checkpointing:
            raise RecipeError("recipe fields 'distributed.fsdp.activation_checkpointing' and "
                              "'train.gradient_checkpointing' both recompute activations: set one of them")

    @property
    def is_eval_process(self) -> bool:
        return True  # forward passes gather each layer from every process: all take part

    @property
    def is_generate_process(self) -> bool:
        return True

    def prepare(self, model, make_optimizer):
        ensure_process_group(self.device)
        if self.device.type == "cpu":  # the heap fragments under sharded steps: map large blocks (allocator.py)
            map_large_blocks()
        # the unsharded twin export will fill (train/skeleton.py): made before the parameters become shards
        self._skeleton = meta_skeleton(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            shard_model(model, self.recipe.distributed.fsdp, self.device)
        # transformers' output slices are views: FSDP2 warns about in-place ops on them, which nothing here does
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return model, make_optimizer(model)  # the optimizer holds the shards (DTensors)

    def backward(self, loss):
        loss.backward()

    def end_step(self):
        if self.device.type == "cpu":  # keep the resident set at what the shards need between steps (allocator.py)
            release_freed_memory()

    def no_sync(self, model):
        return contextlib.nullcontext()  # reduce-scatter every micro-batch (module docstring)

    def clip_grad_norm(self, params, max_norm):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if hasattr(norm, "full_tensor"):  # a DTensor holding this process's partial norm: reduce it
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm,
                                             foreach=True)
        return float(norm)

    def save_checkpoint(self, run_dir, step, *, model, method, optimizer, state, keep):
        return dcp.save_sharded(run_dir, step, model=model, method=method, optimizer=optimizer, state=state,
                                keep=keep)

    def load_checkpoint(self, path, *, model, method, optimizer):
        if not dcp.is_sharded_checkpoint(path):
            raise RecipeError(f"{path} was written by distributed.backend=ddp (whole tensors, optimizer state by "
                              "position): resume it with ddp; fsdp resumes sharded checkpoints on any number of "
                              "processes")
        return dcp.load_sharded(path, model=model, method=method, optimizer=optimizer, rank=self.process_index)

    def gather_full_state(self, model):
        # every process sends its shards; the main process gets whole tensors on the CPU, the others nothing
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.is_main_process else None

    def export_model(self, model):
        if self._skeleton is None:  # never prepared (a run that did not train): the model is whole already
            return model if self.is_main_process else None
        full = self.gather_full_state(model)
        if not self.is_main_process:
            return None
        return materialize(self._skeleton, full)
