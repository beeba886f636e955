"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): every process writes its own shard.

Layout of `<run>/checkpoints/step-000120/` (the same directory, `latest` pointer and pruning as the
replicated checkpoints of train/checkpoint.py; only the tensors differ):
  shards/                 DCP: `__<rank>_0.distcp` per process + `.metadata` (the global shapes and where
                          every piece lives), holding {"model": trainable tensors by parameter name,
                          "optimizer": optimizer state by parameter name (`get_optimizer_state_dict`)}
  state.json              step, scheduler, method, batch source, plus "checkpoint_format": "dcp" and the
                          world size that wrote it
  rng-<rank>.pt           each process's RNG state, written by that process

Atomic as the replicated ones (`checkpoint.save_collective_checkpoint`): the main process makes the temporary
directory and tells the others its name, every process writes its shard and RNG there, and once all are done
the main process writes state.json, renames the directory into place and points `latest` at it. A crash at any
moment leaves the previous checkpoint complete. Every process must see the same directory (one machine, or a
shared file system across machines: DCP's own requirement).

Re-sharding: DCP stores each tensor's global shape and every shard's offsets, and `dcp.load` fills whatever
the loading processes hold (their DTensor shards, or whole tensors), so a checkpoint written by 2 processes
resumes on 1 or 4, under `fsdp` or `ddp`. Parameter names are those of the model (FSDP2 does not rename
them), and the optimizer state is keyed by those names, not by position, so it re-shards too.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from tunelab.train import checkpoint as ckpt
from tunelab.train.interfaces import TrainMethod

log = logging.getLogger(__name__)

FORMAT = "dcp"  # state.json's "checkpoint_format" (checkpoint.SHARDED_FORMATS)
SHARDS = "shards"  # the DCP directory inside a checkpoint


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDS / ".metadata").is_file()


def save_sharded(run_dir: Path, step: int, *, model: torch.nn.Module, method: TrainMethod, optimizer: Any,
                 state: dict[str, Any], keep: int) -> Path | None:
    """Collective: every process calls it with its shards. Returns the checkpoint directory on the main process."""
    # {"model": {name: DTensor shard | tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}
    sd: dict[str, Any] = {"model": method.trainable_state_dict(model),
                          "optimizer": get_optimizer_state_dict(model, optimizer)}
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ckpt.save_collective_checkpoint(
        run_dir, step, write=lambda tmp: dcp.save(sd, checkpoint_id=tmp / SHARDS),
        state={**state, "checkpoint_format": FORMAT, "world_size": world}, keep=keep)


def load_sharded(path: Path, *, model: torch.nn.Module, method: TrainMethod, optimizer: Any,
                 rank: int) -> dict[str, Any]:
    """Collective: restore trainable tensors and optimizer state into this process's shards (re-sharding when the
    checkpoint was written by another number of processes) and this process's RNG; returns state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    # the targets: this process's pieces of every trainable tensor (views of the parameters) and of the optimizer
    # state (`get_optimizer_state_dict` creates the state first, with a zero-lr step, when there is none yet)
    sd: dict[str, Any] = {"model": method.trainable_state_dict(model),
                          "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(sd, checkpoint_id=path / SHARDS)
    method.load_trainable_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for process %d (written by %s processes): its random streams (dropout) "
                    "start afresh", path, rank, state.get("world_size", "?"))
    return state


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a sharded checkpoint, whole, in one process (no process group is used)."""
    shards = Path(path) / SHARDS
    meta = dcp.FileSystemReader(str(shards)).read_metadata()
    prefix = "model."
    out: dict[str, torch.Tensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(md, dcp.metadata.TensorStorageMetadata):
            out[key[len(prefix):]] = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": out}, checkpoint_id=shards, no_dist=True)
    return out
