"""The run directory: everything a run produces, in one place.

  runs/<name>/
    recipe.yaml         the resolved recipe (defaults filled in)
    metrics.jsonl       one JSON line per logged step: step, loss, lr, tokens_per_s, memory_mb, ...
    eval_before.json    evaluation of the base model
    eval_after.json     evaluation of the trained model
    summary.json        before/after table, trainable parameters, wall time, where the exports are
    checkpoints/        see tunelab.train.checkpoint
    export/adapter/     PEFT-format adapter (adapter methods)
    export/merged/      merged model in HF format
A run directory is never overwritten silently: a name in use gets a numbered suffix unless
`--overwrite` is given (or `--resume`, which continues the run in it).
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tunelab.core.io import atomic_write_json, atomic_write_text


def new_run_dir(output_dir: str | Path, name: str, *, overwrite: bool = False, resume: bool = False) -> Path:
    base = Path(output_dir) / name
    if resume:
        if not base.is_dir():
            raise FileNotFoundError(f"--resume: run directory {base} does not exist")
        return base
    if base.exists() and overwrite:
        shutil.rmtree(base)
    if not base.exists():
        base.mkdir(parents=True)
        return base
    i = 2
    while (candidate := base.with_name(f"{base.name}-{i}")).exists():
        i += 1
    candidate.mkdir(parents=True)
    return candidate


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: max allocated on CUDA, max resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint we restart from."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_json(run_dir: Path, name: str, obj: Any) -> Path:
    path = Path(run_dir) / name
    atomic_write_json(path, obj)
    return path
