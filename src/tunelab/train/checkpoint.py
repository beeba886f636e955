"""Checkpoints that survive crashes: written to a temporary directory, then renamed into place.

Layout of `<run>/checkpoints/step-000120/`:
  trainable.safetensors   the trainable tensors by parameter name (all weights for full fine-tuning)
  optimizer.pt            optimizer state (tensors + plain values; loaded with weights_only=True)
  state.json              step, scheduler state, method state, batch-source state (the data position)
  rng-<rank>.pt           torch / python / numpy RNG state of each process
`<run>/checkpoints/latest` names the newest complete checkpoint. A directory appears under its final
name only once every file in it is written (core/io.atomic_dir), so a crash mid-save leaves the previous one
intact; old checkpoints are pruned by renaming them away before deleting them (core/io.atomic_remove), so no
half-deleted checkpoint ever carries a final name. The orphans a kill leaves (`*.tmp-*`, `*.old-*`) are removed
by `clean_checkpoints` when the run starts again, under the run directory's lock.

Loading checks what it reads: a damaged file raises `CheckpointError` naming it, and `check_resumable` says
which earlier checkpoint is intact.

Sharded backends write the same directory, `latest` pointer and pruning, with their tensors in a format of their
own instead of trainable.safetensors + optimizer.pt (state.json's "checkpoint_format" says which):
  shards/                 "dcp": torch.distributed.checkpoint, one file per process (train/dcp.py, FSDP2)
  deepspeed/              "deepspeed": DeepSpeed's ZeRO partitions (train/deepspeed_backend.py)
Every process writes its part into the main process's temporary directory (`save_collective_checkpoint`).
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tunelab.core.io import (
    atomic_dir,
    atomic_remove,
    atomic_write_text,
    remove_orphans,
    safetensors_problem,
)
from tunelab.core.rundir import CHECKPOINTS_DIR

STEP_DIR = re.compile(r"step-\d{6,}")  # a checkpoint's final name
# state.json's "checkpoint_format" of sharded checkpoints -> the file (or directory) that must be in them
SHARDED_FORMATS = {"dcp": "shards/.metadata", "deepspeed": "deepspeed"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file (and an intact earlier checkpoint)."""


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # the legacy tuple (name, keys, pos, has_gauss, cached_gaussian)
    state: dict[str, Any] = {
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
    return Path(run_dir) / CHECKPOINTS_DIR


def _complete(root: Path) -> list[Path]:
    """The checkpoints under their final names, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()),
                  key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], rng_states: list[dict[str, Any]], keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. One process writes it: the
    backend's (train/backends.py) `save_checkpoint`, which every process calls, decides which."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        # safetensors refuses shared storage (tied weights): save each tensor contiguous and owned.
        save_file({k: v.detach().contiguous().clone() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng-{rank}.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    publish_checkpoint(final, keep)
    return final


def publish_checkpoint(final: Path, keep: int) -> None:
    """Point `latest` at the complete checkpoint `final`, then prune all but the newest `keep` (main process)."""
    root = final.parent
    atomic_write_text(root / "latest", final.name + "\n")
    for old in _complete(root)[:-keep]:
        atomic_remove(old)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_collective_checkpoint(run_dir: Path, step: int, *, write: Callable[[Path], None], state: dict[str, Any],
                               keep: int) -> Path | None:
    """Checkpoint `step` written by EVERY process (sharded backends): `write(tmp)` writes this process's part
    into one temporary directory, which the main process creates (core/io.atomic_dir) and names to the others;
    each process adds its RNG state; once all are done (a barrier) the main process writes state.json, renames
    the directory into place and publishes it. A crash before the rename leaves the previous checkpoint as it
    was. Every process must see the same directory (one machine, or a file system shared by the machines).
    Returns the checkpoint on the main process, None on the others."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def part(tmp: Path) -> None:
        write(tmp)
        torch.save(rng_state(), tmp / f"rng-{_rank()}.pt")
        _barrier()  # every process's part is on disk

    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final) as tmp:
            if multi:
                dist.broadcast_object_list([str(tmp)], src=0)
            part(tmp)
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        publish_checkpoint(final, keep)
    else:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        part(Path(box[0]))
    _barrier()  # nobody goes on (or reads `latest`) before the checkpoint is published
    return final if _rank() == 0 else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if STEP_DIR.fullmatch(name) and (root / name / "state.json").is_file():
            return root / name
    complete = _complete(root)
    return complete[-1] if complete else None


def clean_checkpoints(run_dir: Path) -> list[Path]:
    """Remove what killed writers left in `<run>/checkpoints`: temporary and half-pruned directories, and (from
    older versions) final-named directories without their state.json. Call with the run directory locked."""
    root = checkpoint_dir(run_dir)
    removed = remove_orphans(root)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if STEP_DIR.fullmatch(p.name) and p.is_dir() and not (p / "state.json").is_file():
                atomic_remove(p)
                removed.append(p)
    return removed


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive: a missing or truncated one has no readable central directory."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete torch file ({e})"


def checkpoint_problem(path: Path) -> tuple[Path, str] | None:
    """(damaged file, why) for the first file of checkpoint `path` that cannot be loaded, or None.

    Reads headers only (the safetensors header and size, the zip directory of the .pt files, state.json).
    """
    path = Path(path)
    state = path / "state.json"
    try:
        loaded = json.loads(state.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict) or not isinstance(loaded.get("step"), int):
            return state, "has no integer 'step'"
    except (OSError, UnicodeDecodeError) as e:
        return state, f"unreadable ({e})"
    except json.JSONDecodeError as e:
        return state, f"not valid JSON ({e})"
    sharded = SHARDED_FORMATS.get(str(loaded.get("checkpoint_format")))
    if sharded is not None:  # its own format: the file that says the shards are complete must be there
        if not (path / sharded).exists():
            return path / sharded, "missing"
    elif problem := safetensors_problem(path / "trainable.safetensors"):
        return path / "trainable.safetensors", problem
    for f in [*([] if sharded else [path / "optimizer.pt"]), *sorted(path.glob("rng-*.pt"))]:
        if problem := _torch_file_problem(f):
            return f, problem
    return None


def _damaged(path: Path, file: Path, problem: str) -> CheckpointError:
    """The error for a damaged checkpoint, offering the newest intact one before it."""
    earlier = [p for p in _complete(path.parent) if STEP_DIR.fullmatch(path.name) and _step_of(p) < _step_of(path)
               and checkpoint_problem(p) is None]
    if earlier:
        hint = (f"the previous checkpoint {earlier[-1].name} is intact: delete {path} (or move it out of "
                f"{path.parent}) and resume again to continue from step {_step_of(earlier[-1])}")
    else:
        hint = "no intact checkpoint is left before it: start the run again (--overwrite)"
    return CheckpointError(f"checkpoint file {file} is damaged: {problem}; {hint}")


def check_resumable(run_dir: Path) -> Path | None:
    """The checkpoint `--resume` will load (None: there is none), after checking its files; a damaged one
    raises CheckpointError naming the file and the intact checkpoint before it."""
    path = latest_checkpoint(run_dir)
    if path is not None and (found := checkpoint_problem(path)) is not None:
        raise _damaged(path, *found)
    return path


def load_checkpoint(path: Path, rank: int = 0, *,
                    sharded_readers: Mapping[str, Callable[[Path], dict[str, torch.Tensor]]] | None = None
                    ) -> dict[str, Any]:
    """Every file of checkpoint `path` (this process's RNG state, rng-<rank>.pt). A file that does not load
    raises CheckpointError naming it.

    A sharded checkpoint (see the module docstring) is read by `sharded_readers[format]` (path -> its trainable
    tensors, gathered whole) and gives no optimizer state (None): what `tunelab eval` / `export` of a run need;
    `tunelab.train.restore.read_checkpoint` passes the readers of dcp.py and deepspeed_backend.py, so this module
    imports neither. Training resumes from one through the backend's `load_checkpoint`, which re-shards it."""
    path = Path(path)
    if (found := checkpoint_problem(path)) is not None:
        raise _damaged(path, *found)
    rng_file = path / f"rng-{rank}.pt"
    fmt = json.loads((path / "state.json").read_text(encoding="utf-8")).get("checkpoint_format")
    read_sharded = (sharded_readers or {}).get(str(fmt))
    if fmt in SHARDED_FORMATS and read_sharded is None:
        raise CheckpointError(f"checkpoint {path} is sharded ({fmt!r}); read it with "
                              f"tunelab.train.restore.read_checkpoint, or resume it with the backend that wrote it")
    loaders = {
        "state": (path / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8"))),
        "trainable": (path / "trainable.safetensors", lambda f: load_file(str(f))),
        "optimizer": (path / "optimizer.pt", lambda f: torch.load(f, weights_only=True)),
        "rng": (rng_file, lambda f: torch.load(f, weights_only=True) if f.is_file() else None),
    }
    if fmt in SHARDED_FORMATS:
        assert read_sharded is not None
        loaders["trainable"] = (path, read_sharded)
        loaders["optimizer"] = (path, lambda f: None)
    out = {}
    for key, (file, load) in loaders.items():
        try:
            out[key] = load(file)
        except Exception as e:  # the headers passed: whatever fails now is damage inside the file
            raise _damaged(path, file, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return out
