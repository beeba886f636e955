"""What the board reads: run and sweep directories under one root, as the runner and `tunelab sweep` write them.

Every path a request names goes through `inside(root, rel)`: resolved (symbolic links followed) and refused unless
it stays under the root; hidden components (`.board`, `.tunelab.lock`, ...) are refused too. Run directories are
found by their `recipe.yaml` (sweep directories by `sweep.yaml`, whose trials are run directories under
`trials/`), up to `MAX_DEPTH` levels below the root. Run rows come from `tunelab.track.report.load_run` and
`main_row`, the same reading `tunelab report` does.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.process import pid_alive
from tunelab.core.rundir import LOCK_NAME
from tunelab.track.report import load_run, main_row

MAX_DEPTH = 4
SKIP_DIRS = {"checkpoints", "export", "recipes", "logs", "wandb", "mlruns", "tensorboard", "__pycache__"}
READABLE = {".json", ".jsonl", ".yaml", ".yml", ".html", ".png", ".log", ".txt", ".md", ".csv"}


class Forbidden(ValueError):
    """A request for a path outside the runs directory (or a hidden one)."""


def inside(root: Path, rel: str) -> Path:
    """`root / rel`, resolved, or Forbidden when it leaves `root` or names a hidden component."""
    if not rel or "\x00" in rel:
        raise Forbidden("empty path")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or any(p in ("..", ".") or p.startswith(".") for p in parts):
        raise Forbidden(f"not a path inside the runs directory: {rel!r}")
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):  # a link that points out
        raise Forbidden(f"not a path inside the runs directory: {rel!r}")
    return target


def run_id(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def find_dirs(root: Path) -> tuple[list[Path], list[Path]]:
    """(run directories, sweep directories) under root, sorted by path."""
    runs: list[Path] = []
    sweeps: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            if c.is_symlink() and not c.resolve().is_relative_to(root.resolve()):
                continue
            if (c / "sweep.yaml").is_file():
                sweeps.append(c)
                walk(c, depth + 1)
            elif (c / "recipe.yaml").is_file():
                runs.append(c)
            elif depth < MAX_DEPTH and c.name not in SKIP_DIRS:
                walk(c, depth + 1)

    walk(root, 1)
    return runs, sweeps


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process holding the run's lock on this machine, if any: `core.rundir.lock_run_dir` writes its pid
    and host into `.tunelab.lock` and removes the file on release; a file left by a killed process names a pid that
    no longer runs. Read only: the board never takes (or probes) the lock, so it can never make a run wait."""
    try:
        info = json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("host") not in (None, socket.gethostname()):
        return None
    pid = info.get("pid")
    return info if isinstance(pid, int) and pid_alive(pid) else None


def disk_status(run_dir: Path) -> str:
    """running (a live lock holder) | finished (summary.json) | incomplete (stopped, crashed, or still starting)."""
    if lock_holder(run_dir) is not None:
        return "running"
    if (run_dir / "summary.json").is_file():
        return "finished"
    return "incomplete"


@dataclass
class RunCache:
    """Run rows cached by the (size, mtime) of the files they are read from: the list is polled every second."""

    rows: dict[Path, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)

    def row(self, root: Path, path: Path) -> dict[str, Any]:
        key = tuple(_stamp(path / f) for f in ("summary.json", "metrics.jsonl", "recipe.yaml", "eval_after.json"))
        cached = self.rows.get(path)
        if cached is None or cached[0] != key:
            cached = (key, run_row(root, path))
            self.rows[path] = cached
        return dict(cached[1])


def _stamp(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0


def run_row(root: Path, path: Path) -> dict[str, Any]:
    """One line of the runs table (without the live status, which `with_status` adds)."""
    run = load_run(path)
    m = main_row(run)
    last = run.metrics[-1] if run.metrics else {}
    train = run.recipe.get("train") or {}
    score = m["task"]
    return {
        "id": run_id(root, path), "name": path.name, "method": m["method"],
        "objective": (run.recipe.get("objective") or {}).get("name"),
        "model": (run.recipe.get("model") or {}).get("name_or_path"),
        "step": last.get("step"), "max_steps": train.get("max_steps"), "loss": last.get("loss"),
        "eval_loss": next((r["eval_loss"] for r in reversed(run.metrics) if "eval_loss" in r), None),
        "score_metric": score["metric"] if score else None, "score_before": score["before"] if score else None,
        "score_after": score["after"] if score else None, "tokens_per_s": m["tokens_per_s"],
        "peak_memory_mb": m["peak_memory_mb"], "wall_time_s": m["wall_time_s"],
        "updated": max(_stamp(path / "metrics.jsonl")[1], _stamp(path / "recipe.yaml")[1]) / 1e9,
        "has_checkpoint": (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()),
    }


def run_detail(root: Path, path: Path) -> dict[str, Any]:
    """Everything the run page shows: the row, metrics, evaluations (with samples), the resolved recipe."""
    run = load_run(path)
    evals = {k: v for k, v in run.evals.items()}
    recipe_text = (path / "recipe.yaml").read_text(errors="replace") if (path / "recipe.yaml").is_file() else ""
    return {**run_row(root, path), "metrics": run.metrics, "evals": evals, "summary": run.summary,
            "recipe_yaml": recipe_text, "problems": run.problems}


def sweep_row(root: Path, path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    trials = sorted(p.name for p in (path / "trials").glob("trial-*") if p.is_dir()) if (path / "trials").is_dir() \
        else []
    return {"id": run_id(root, path), "name": path.name, "objectives": summary.get("objectives"),
            "trials": summary.get("trials") or {"total": len(trials)}, "best": summary.get("best", []),
            "wall_time_s": summary.get("wall_time_s"),
            "report": run_id(root, path / "report.html") if (path / "report.html").is_file() else None}
