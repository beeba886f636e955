"""The board's launch queue: runs start as their own `python -m tunelab.cli run ...` processes, `max_parallel` at a
time (1 by default: on a CPU two runs only slow each other down).

A job is queued -> running -> finished | failed | stopped (or cancelled while queued). Each process gets a session
of its own (`core.process.start_process`), so closing the browser, or the board itself stopping, leaves it running;
a run that crashes is a failed job and the server carries on. Stop = SIGTERM to the process group (SIGKILL after a
grace period); resume = `tunelab run RUN --resume`, an ordinary job. Output goes to `<root>/.board/logs/`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.process import start_process, stop_process, tunelab_command

log = logging.getLogger("tunelab")

ACTIVE = ("queued", "running", "stopping")


@dataclass
class Job:
    id: int
    run_dir: Path  # where the run writes (known before it starts: the board picks the name)
    argv: list[str]
    log_path: Path
    kind: str = "run"  # run | resume
    status: str = "queued"
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    proc: Any = None
    stop_requested: bool = False

    def public(self, root: Path) -> dict[str, Any]:
        return {"id": self.id, "run": self.run_dir.relative_to(root).as_posix(), "kind": self.kind,
                "status": self.status, "returncode": self.returncode, "created": self.created,
                "started": self.started, "ended": self.ended,
                "pid": self.proc.pid if self.proc is not None and self.status in ACTIVE else None}


class JobQueue:
    """Jobs in submission order; a daemon thread starts queued ones and reaps finished ones."""

    def __init__(self, root: Path, *, max_parallel: int = 1, command: list[str] | None = None, poll_s: float = 0.2):
        self.root = root
        self.max_parallel = max_parallel
        self.command = command or tunelab_command()  # + "run", recipe or run dir[, "--resume"]
        self.poll_s = poll_s
        self.jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunelab-board-queue", daemon=True)
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------------------------------
    def submit(self, run_dir: Path, args: list[str], kind: str = "run") -> Job:
        with self._lock:
            if self.active_for(run_dir) is not None:
                raise ValueError(f"{run_dir.name} is already queued or running")
            jid = next(self._ids)
            job = Job(jid, run_dir, [*self.command, *args], self.root / ".board" / "logs" / f"{jid:04d}-"
                      f"{run_dir.name}.log", kind=kind)
            self.jobs.append(job)
        return job

    def stop(self, run_dir: Path) -> Job | None:
        """Cancel a queued job, or signal a running one (in the background: stopping takes up to the grace
        period). None when the board has no active job for this run."""
        with self._lock:
            job = self.active_for(run_dir)
            if job is None:
                return None
            job.stop_requested = True
            if job.status == "queued":
                job.status, job.ended = "cancelled", time.time()
                return job
            job.status = "stopping"
            proc = job.proc
        threading.Thread(target=stop_process, args=(proc,), daemon=True).start()
        return job

    def active_for(self, run_dir: Path) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs if j.run_dir == run_dir and j.status in ACTIVE), None)

    def latest_for(self, run_dir: Path) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self.jobs) if j.run_dir == run_dir), None)

    def pending_names(self) -> set[str]:
        with self._lock:
            return {j.run_dir.name for j in self.jobs if j.status in ACTIVE}

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.public(self.root) for j in self.jobs]

    def shutdown(self, *, stop_runs: bool = False) -> None:
        """Stop dispatching; the runs keep going unless `stop_runs`."""
        self._stop.set()
        self._thread.join(timeout=5)
        if stop_runs:
            for j in list(self.jobs):
                if j.proc is not None and j.status in ("running", "stopping"):
                    stop_process(j.proc)

    # -- the dispatcher ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the board outlives anything a run does
                log.exception("board queue")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        with self._lock:
            for j in self.jobs:
                if j.proc is not None and j.status in ("running", "stopping") and j.proc.poll() is not None:
                    j.returncode, j.ended = j.proc.returncode, time.time()
                    j.status = "stopped" if j.stop_requested else ("finished" if j.returncode == 0 else "failed")
            running = sum(1 for j in self.jobs if j.status in ("running", "stopping"))
            for j in self.jobs:
                if running >= self.max_parallel:
                    break
                if j.status == "queued":
                    try:
                        j.proc = start_process(j.argv, j.log_path)
                        j.status, j.started = "running", time.time()
                        running += 1
                    except OSError as e:
                        j.status, j.ended = "failed", time.time()
                        j.log_path.parent.mkdir(parents=True, exist_ok=True)
                        j.log_path.write_text(f"could not start: {e}\n")
