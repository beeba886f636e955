"""Checkpoints that survive crashes: written to a temporary directory, then renamed into place.

Layout of `<run>/checkpoints/step-000120/`:
  trainable.safetensors   the trainable tensors by parameter name (all weights for full fine-tuning)
  optimizer.pt            optimizer state (tensors + plain values; loaded with weights_only=True)
  state.json              step, scheduler state, method state, batch-source state (the data position)
  rng-<rank>.pt           torch / python / numpy RNG state of each process
`<run>/checkpoints/latest` names the newest complete checkpoint. A directory appears under its final
name only once every file in it is written, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.core.io import atomic_dir, atomic_write_text, is_temporary


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], rng_states: list[dict[str, Any]], keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. One process writes it: the
    backend's (train/backends.py) `save_checkpoint`, which every process calls, decides which."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        # safetensors refuses shared storage (tied weights): save each tensor contiguous and owned.
        save_file({k: v.detach().contiguous().clone() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng-{rank}.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    atomic_write_text(root / "latest", final.name + "\n")
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not is_temporary(p))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file() and not is_temporary(p))
    return complete[-1] if complete else None


def load_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-{rank}.pt"
    return {
        "state": state,
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True) if rng_file.is_file() else None,
    }
