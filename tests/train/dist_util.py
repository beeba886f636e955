"""Helpers of the multi-process tests: launch `tunelab` (or a test script) under torchrun, read what a run logged.

Every launch gets a free port of its own, so tests of several engineers on one machine do not collide; every
process runs one torch thread (two processes on two cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_recipe_dict

CRASH_RUN = str(Path(__file__).parent / "crash_run.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run(args: list[str], *, ok: bool = True, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, env=env(**extra_env), timeout=timeout)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def torchrun(nproc: int, *args: str, port: int | None = None, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    """The command line of `torchrun` (python -m torch.distributed.run) for `args` (a script, or -m module)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port or free_port())]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1"]
    return cmd + list(args)


def cli(*args: str) -> list[str]:
    return ["-m", "tunelab.cli", *args]


def one_process(*args: str) -> list[str]:
    return [sys.executable, *args]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / |a| over the curve; |a| floored at 1e-2, so losses near 0 (distillation from the model
    itself starts at exactly 0) are compared absolutely (rel 1e-5 -> 1e-7 absolute)."""
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / max(abs(x), 1e-2) for x, y in zip(a, b))


def max_abs_loss_diff(a: list[float], b: list[float]) -> float:
    """Largest |a - b| over two loss curves of equal length (0.0 when they are identical)."""
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def export_tensors(run_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    """The safetensors of `<run>/export/<kind>` (adapter or merged)."""
    (path,) = sorted((Path(run_dir) / "export" / kind).glob("*.safetensors"))
    return load_file(str(path))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# The recipes of the equality tests: the tiny Llama on the date task, 10 steps of a global batch of 4 (2 processes x
# 1 micro-batch of 2, or 1 process x 2 micro-batches of 2), a sharded-or-not checkpoint every 4 steps.
STEPS = 10
LORA = {"method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-2, "precision": "bf16", "save_every": 4,
                  "keep_checkpoints": 3}}
FULL = {"method": {"name": "full"},
        "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-3, "precision": "fp32", "save_every": 4,
                  "keep_checkpoints": 3}}


class Runs:
    """`tunelab train` runs made on demand and shared by the tests of a module (each costs a launch)."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir, self.done = root, model_dir, {}

    def recipe(self, kind: str) -> str:
        """The recipe file of `kind` ("lora" or "full")."""
        path = self.root / f"{kind}.yaml"
        if not path.exists():
            d = tiny_recipe_dict(self.model_dir, self.root / "runs", **(LORA if kind == "lora" else FULL),
                                 eval={"before": False, "after": False})
            path.write_text(yaml.safe_dump(d))
        return str(path)

    def dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def get(self, name: str, kind: str, nproc: int, *overrides: str, command: str = "train") -> Path:
        """Run `name`: `tunelab <command>` of recipe `kind` on `nproc` processes (1: no torchrun; grad_accum
        2 / nproc), once."""
        if name not in self.done:
            args = cli(command, self.recipe(kind), f"name={name}", f"train.grad_accum={2 // nproc}", *overrides)
            run(one_process(*args) if nproc == 1 else torchrun(nproc, *args))
            self.done[name] = self.dir(name)
        return self.done[name]
