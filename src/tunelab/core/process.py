"""Child processes that outlive their parent's interest: started in a session of their own, stopped by signal.

A run launched by `tunelab board` or a trial of `tunelab sweep` is an ordinary `python -m tunelab.cli run ...`
process. It gets its own session (process group), so a signal to the group reaches anything it started, and
closing the terminal or browser that asked for it does not stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def tunelab_command(*args: str) -> list[str]:
    """`python -m tunelab.cli ARGS...` with this interpreter: how runs and trials are started."""
    return [sys.executable, "-m", "tunelab.cli", *args]


def start_process(argv: list[str], log_path: str | Path, *, cwd: str | Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` (a list: never a shell string) with stdout and stderr appended to `log_path`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True)


def stop_process(proc: subprocess.Popen, *, grace_s: float = 10.0) -> int:
    """SIGTERM to the process group, SIGKILL after `grace_s`; returns the exit code. Only `proc` and what it
    started are signalled (its own process group)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group's id is the child's pid (start_new_session)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this machine (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
