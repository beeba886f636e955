"""Batch sources: where each optimizer step's micro-batches come from.

The loop (train/loop.py) does not own a dataset: per step it asks a `BatchSource` for this process's
`grad_accum` micro-batches, already collated and on the device. The contract:

* `steps`: optimizer steps of the run, or None (until stopped: the loop then runs at most `train.max_steps`
  steps, and ends early at the first step for which the source returns no micro-batches; every process must
  run dry at the same step);
* `micro_batches(step, model)`: this process's micro-batches of 0-based step `step` (`model` is the model
  being trained, unwrapped, for sources that generate with it);
* `state_dict()` / `load_state_dict()`: JSON state saved in each checkpoint's state.json under "source" and
  restored on resume before the first resumed step, so a resumed run sees exactly the batches the
  uninterrupted one would have;
* `generates`: True for a source that runs the model (rollouts). The loop then calls `micro_batches` inside
  `generation_mode(model)`: eval mode (no dropout), no autograd, and no compiled regions (`train.compile`'s
  layers run eagerly: a growing KV cache would recompile them at every length).

`StaticBatchSource` is the fixed-dataset source: StepSampler (data order a pure function of (seed, epoch);
step k reads the k-th global window, process r its slice) + the objective's collator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from tunelab.data.batching import StepSampler, make_collator
from tunelab.recipe import Recipe
from tunelab.train.backends import Backend

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@runtime_checkable
class BatchSource(Protocol):
    steps: int | None
    generates: bool

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, compiled modules eager: what generating with the policy between steps needs.

    Modules compiled with `nn.Module.compile` (train.compile's decoder layers) get their compiled call
    detached for the duration and put back after, as are the training mode and grad mode.
    """
    was_training = model.training
    compiled = {m: impl for m in model.modules() if (impl := getattr(m, "_compiled_call_impl", None)) is not None}
    for m in compiled:
        m._compiled_call_impl = None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        for m, impl in compiled.items():
            m._compiled_call_impl = impl


class StaticBatchSource:
    """A fixed list of encoded examples, read in StepSampler's order and collated for the objective."""

    generates = False

    def __init__(self, data: list[dict], collate: Callable[[list[dict], int], Batch], *, pad_id: int,
                 device: torch.device, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 steps: int | None = None, epochs: float = 1.0):
        self.data, self.collate, self.pad_id, self.device = data, collate, pad_id, device
        self.sampler = StepSampler(len(data), batch_size, grad_accum, world_size, rank, seed)
        self.steps = steps if steps is not None else self.sampler.steps_for_epochs(epochs)
        self.position = 0  # steps served so far: the next step to serve (the data position IS the step number)

    @classmethod
    def from_recipe(cls, recipe: Recipe, data: list[dict], *, batch_kind: str, pad_id: int,
                    backend: Backend) -> StaticBatchSource:
        """The source `tunelab run` trains on: `train.*` sizes, seed and length; the collator for `batch_kind`
        (packed rows for SFT under `data.packing`); this process's slice of each global window."""
        tc = recipe.train
        return cls(data, make_collator(batch_kind, recipe.data), pad_id=pad_id, device=backend.device,
                   batch_size=tc.batch_size, grad_accum=tc.grad_accum, world_size=backend.num_processes,
                   rank=backend.process_index, seed=tc.seed, steps=tc.max_steps, epochs=tc.epochs)

    def micro_batches(self, step: int, model: torch.nn.Module | None = None) -> list[Batch]:
        out = [{k: v.to(self.device) for k, v in self.collate([self.data[i] for i in idx], self.pad_id).items()}
               for idx in self.sampler.micro_batches(step)]
        self.position = step + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {"kind": "static", "position": self.position, "examples_seen": self.position * s.global_batch,
                "n_examples": s.n, "global_batch": s.global_batch, "seed": s.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position only: batches are a pure function of the step. A checkpoint of other data or another
        global batch cannot resume exactly; that is said, not hidden."""
        s = self.sampler
        for key, now in (("n_examples", s.n), ("global_batch", s.global_batch), ("seed", s.seed)):
            if key in state and state[key] != now:
                log.warning("resuming with %s %s (the checkpoint had %s): the data order differs from the "
                            "interrupted run's", key, now, state[key])
        self.position = int(state.get("position", 0))
