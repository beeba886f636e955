"""Distributed backends: everything that differs between replicated (DDP) and sharded training.

The loop and the runner call a `Backend`; nothing else in the house asks which one runs. A backend owns:

* `prepare(model, make_optimizer)`: the model is wrapped (or sharded) FIRST and the optimizer is built on
  the prepared model's parameters afterwards, as accelerate's FSDP guide requires (FSDP2's `fully_shard`
  replaces parameters by DTensors, so an optimizer built before would hold the old ones);
* `backward`, `no_sync` (skip the gradient all-reduce on all but the last micro-batch), `reduce_sum`;
* `clip_grad_norm(params, max_norm)`: the GLOBAL gradient norm before clipping, or None where the engine
  does not report it (DeepSpeed's `clip_grad_norm_` returns None: clipping happens inside its step);
* `save_checkpoint` / `load_checkpoint`: every process calls them (collective: sharded backends save one
  shard per process);
* `is_eval_process` / `is_generate_process`: which processes run evaluation and which generate rollouts;
* `gather_full_state(model)`: the full, unsharded weights for export; `export_model(model)`: an unsharded
  model holding them, on the main process (what `tunelab.export` writes adapters and merged models from).

Backends (`distributed.backend`, docs/distributed.md):
* `ddp` (`DDPBackend`, here): accelerate's DDP, or no wrapper at all in one process;
* `fsdp` (`train/fsdp.py`): FSDP2 `fully_shard` per decoder layer + root, sharded DCP checkpoints
  (`train/dcp.py`) that resume on any number of processes;
* `deepspeed` (`train/deepspeed_backend.py`): ZeRO stage 1-3, the optional extra `tunelab[deepspeed]`.
They are imported when named, so the DeepSpeed package is needed only by runs that use it.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from tunelab.recipe import Recipe, RecipeError
from tunelab.train import checkpoint as ckpt
from tunelab.train import dcp
from tunelab.train.interfaces import TrainMethod

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Backend(ABC):
    """One distributed backend over an `accelerate.Accelerator` (the launcher and process group)."""

    name: ClassVar[str] = ""
    sharded: ClassVar[bool] = False  # whether parameters are split across processes (methods must support it)

    def __init__(self, accelerator: Any, recipe: Recipe | None = None):
        self.accelerator = accelerator
        self.recipe = recipe if recipe is not None else Recipe()  # the `distributed` and `train` sections

    @classmethod
    def check(cls, recipe: Recipe) -> None:
        """Refuse (RecipeError naming the field) what this backend cannot run, before any work is done."""

    # -- the process group (the same for every backend) ----------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        """The process that writes files (metrics, summaries, exports)."""
        return self.accelerator.is_main_process

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, so integer counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # -- what differs ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def is_eval_process(self) -> bool:
        """Whether this process runs evaluation (held-out loss, generation-based metrics)."""

    @property
    @abstractmethod
    def is_generate_process(self) -> bool:
        """Whether this process generates rollouts for training (each process its own share of prompts)."""

    @abstractmethod
    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> tuple[Any, Any]:
        """(model to run, optimizer to step): the model is prepared first, then the optimizer is built on it."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        """A context in which backward accumulates locally, without the gradient all-reduce."""

    @abstractmethod
    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float | None:
        """Clip to the global norm; returns that norm before clipping, or None when the engine gives none."""

    @abstractmethod
    def save_checkpoint(self, run_dir: Path, step: int, *, model: torch.nn.Module, method: TrainMethod,
                        optimizer: Any, state: dict[str, Any], keep: int) -> Path | None:
        """Called by EVERY process. `model` is the unwrapped (method's) model; `state` is JSON for state.json.
        Returns the checkpoint directory on the process that wrote it."""

    @abstractmethod
    def load_checkpoint(self, path: Path, *, model: torch.nn.Module, method: TrainMethod,
                        optimizer: Any) -> dict[str, Any]:
        """Called by EVERY process: restores trainable tensors, optimizer and this process's RNG; returns the
        checkpoint's state.json (step, scheduler, method, source) for the loop to restore the rest."""

    @abstractmethod
    def gather_full_state(self, model: Any) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) state dict on the main process, for export; None on the others.
        Every process must call it (sharded backends gather collectively)."""

    def end_step(self) -> None:
        """Called by the loop after each optimizer step (weights updated, gradients cleared)."""

    def export_model(self, model: Any) -> torch.nn.Module | None:
        """An unsharded model with the trained weights on the main process (None on the others), for
        `tunelab.export`; every process must call it. Replicated backends give the trained model itself."""
        return self.accelerator.unwrap_model(model) if self.is_main_process else None


class DDPBackend(Backend):
    """Replicated training through accelerate: DDP across processes, the bare model in one process.

    Every process holds the whole model, so only the main process evaluates and writes checkpoints; every
    process generates (its own prompts) and the gradients are averaged by DDP.
    """

    name = "ddp"

    @property
    def is_eval_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_generate_process(self) -> bool:
        return True

    def prepare(self, model, make_optimizer):
        optimizer = make_optimizer(model)  # on the bare model: DDP keeps the same Parameter objects
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model):
        return self.accelerator.no_sync(model) if self.num_processes > 1 else contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm):
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)

    def save_checkpoint(self, run_dir, step, *, model, method, optimizer, state, keep):
        rngs = [ckpt.rng_state()]
        if self.num_processes > 1:  # every process's RNG state, so each resumes its own stream
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 on a GPU: accelerate's GradScaler
        if scaler is not None:  # resume with the same loss scale, not from 2**16 again
            state = {**state, "grad_scaler": scaler.state_dict()}
        path = None
        if self.is_main_process:  # the weights are the same on every process: one writer, atomically
            path = ckpt.save_checkpoint(run_dir, step, trainable=method.trainable_state_dict(model),
                                        optimizer_state=optimizer.state_dict(), state=state, rng_states=rngs,
                                        keep=keep)
        self.barrier()
        return path

    def load_checkpoint(self, path, *, model, method, optimizer):
        if dcp.is_sharded_checkpoint(path):  # written by `fsdp`: DCP loads it into whole tensors as well
            return dcp.load_sharded(path, model=model, method=method, optimizer=optimizer, rank=self.process_index)
        loaded = ckpt.load_checkpoint(path, self.process_index)
        method.load_trainable_state_dict(model, loaded["trainable"])
        optimizer.load_state_dict(loaded["optimizer"])
        if loaded["rng"] is not None:
            ckpt.set_rng_state(loaded["rng"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "grad_scaler" in loaded["state"]:
            scaler.load_state_dict(loaded["state"]["grad_scaler"])
        return loaded["state"]

    def gather_full_state(self, model):
        if not self.is_main_process:
            return None
        return self.accelerator.unwrap_model(model).state_dict()


# name -> "module:class", imported when a recipe names it (the DeepSpeed package is an optional extra)
BACKENDS: dict[str, str] = {
    "ddp": "tunelab.train.backends:DDPBackend",
    "fsdp": "tunelab.train.fsdp:FSDPBackend",
    "deepspeed": "tunelab.train.deepspeed_backend:DeepSpeedBackend",
}


def _load(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise RecipeError(f"recipe field 'distributed.backend': unknown backend {name!r}; one of {sorted(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def is_sharded(name: str) -> bool:
    """Whether backend `name` splits the model or its optimizer state across processes (methods must support it)."""
    return _load(name).sharded


def backend_class(recipe: Recipe) -> type[Backend]:
    """The Backend class a recipe's `distributed.backend` names, after its `check` of the recipe; a RecipeError
    naming the field when it cannot run (an extra not installed, options that do not go together)."""
    cls = _load(recipe.distributed.backend)
    cls.check(recipe)
    return cls


def build_backend(recipe: Recipe, accelerator: Any) -> Backend:
    return backend_class(recipe)(accelerator, recipe)
