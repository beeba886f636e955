"""The run directory: everything a run produces, in one place, and nothing outside it.

  runs/<name>/
    recipe.yaml         the resolved recipe (defaults filled in)
    metrics.jsonl       one JSON line per logged step: step, loss, lr, tokens_per_s, memory_mb, ...
    eval_before.json    evaluation of the base model
    eval_after.json     evaluation of the trained model
    summary.json        before/after table, trainable parameters, wall time, where the exports are
    checkpoints/        see tunelab.train.checkpoint
    export/adapter/     PEFT-format adapter (adapter methods)
    export/merged/      merged model in HF format
    .tunelab.lock       while a process writes here: its pid, host and start time (see `lock_run_dir`)

Safety rules (docs/reliability.md):
  * a run name is one plain path component (`check_component`), so `<output_dir>/<name>` never leaves
    `output_dir`; a name that resolves elsewhere (a symbolic link) is refused too;
  * a run directory is never overwritten silently: a name in use gets a numbered suffix unless
    `--overwrite` is given (or `--resume`, which continues the run in it); `--overwrite` removes only a tunelab
    run directory (one with a recipe.yaml or continual.yaml, or an empty one), never through a link, and only
    when no other process holds its lock;
  * one writer at a time: `new_run_dir` / `lock_run_dir` take an exclusive lock for this process (an OS
    `flock` on `.tunelab.lock`, which dies with its process, so a lock left by a killed run is stale and
    taken over); a second process is refused with the holder's pid and host;
  * a directory this process created is removed again if the run fails before its first step
    (`discard_if_unstarted`, `invocation`).
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import resource
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.core.io import OLD_MARK, TMP_MARK, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger("tunelab")

LOCK_NAME = ".tunelab.lock"
CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints (tunelab.train.checkpoint)
METRICS_FILE = "metrics.jsonl"
RUN_MARKERS = ("recipe.yaml", "continual.yaml")  # what makes a directory a tunelab run directory


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names the path and why."""


class RunLocked(RunDirError):
    """Another live process holds the run directory's lock."""


# -- names and paths ---------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_component(name: str, what: str = "run name") -> str:
    """`name` if it is one safe path component, else RunDirError saying why.

    Refused: empty, `.` / `..` or any leading dot (hidden, and where tunelab keeps its own files), a path
    separator (`/`, `\\`), control characters, tunelab's temporary-file marks (`.tmp-`, `.old-`), and more
    than 255 bytes (the usual file-name limit).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is a relative path"
    elif name.startswith("."):
        problem = "starts with '.' (hidden)"
    elif _CONTROL.search(name):
        problem = "contains a control character"
    elif TMP_MARK in name or OLD_MARK in name:
        problem = f"contains {TMP_MARK!r} or {OLD_MARK!r} (tunelab's temporary files)"
    elif len(name.encode("utf-8", "surrogateescape")) > 255:
        problem = "is longer than 255 bytes"
    if problem:
        raise RunDirError(f"{what} {name!r} {problem}: it must be a single directory name, such as 'lora-r16'")
    return name


def is_run_dir(path: Path) -> bool:
    """A real (not linked) directory holding a tunelab recipe, or an empty one."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / m).is_file() for m in RUN_MARKERS) or not any(path.iterdir())


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def write_json(run_dir: Path, name: str, obj: Any) -> Path:
    """`obj` as JSON at `<run_dir>/<name>`, atomically; `name` must stay inside the run directory."""
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise RunDirError(f"{name!r} is not a file name inside the run directory {run_dir}")
    for part in rel.parts:
        check_component(part, "file name")
    path = Path(run_dir) / rel
    atomic_write_json(path, obj)
    return path


# -- the lock ------------------------------------------------------------------------------------------------


@dataclass
class RunLock:
    """This process's exclusive hold on one run directory (`count`: nested holders in this process)."""

    run_dir: Path
    fd: int
    count: int = 1

    def release(self) -> None:
        """Drop this hold, unless the lock was already released in full (and perhaps taken anew since)."""
        if _HELD.get(self.run_dir) is self:
            release_run_dir(self.run_dir)


_HELD: dict[Path, RunLock] = {}
_CREATED: set[Path] = set()  # run directories this process created (candidates for discard_if_unstarted)


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv[:8]}


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _holder(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started', '?')})"


def lock_run_dir(run_dir: str | os.PathLike[str]) -> RunLock:
    """Take the run directory's exclusive lock for this process, or raise RunLocked naming the holder.

    The lock is an OS `flock` on `<run>/.tunelab.lock`, which also records our pid, host and start time. The
    kernel drops a flock when its process dies, so the file of a killed run is a stale lock: it is taken over
    (and logged). Where the file system has no flock (some network mounts), the recorded pid decides: a live
    pid on this host, or any pid on another host, holds it. Re-entrant within one process.
    """
    run_dir = Path(run_dir).resolve()
    if (held := _HELD.get(run_dir)) is not None:
        held.count += 1
        return held
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, path)
            # a holder releasing right now unlinks the file after we opened it: lock the new one instead
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        break
    previous = _read_info(path)
    if previous and previous.get("pid") != os.getpid():
        log.warning("%s: taking over a stale lock of %s, which no longer runs", run_dir, _holder(previous))
    data = (json.dumps(_lock_info()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    lock = _HELD[run_dir] = RunLock(run_dir, fd)
    return lock


def _flock(fd: int, path: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        raise RunLocked(f"run directory {path.parent} is in use by {_holder(_read_info(path))}; wait for it to "
                        f"finish or stop it (lock file {path})") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    info = _read_info(path)  # no flock here: trust the recorded holder unless it is certainly dead
    if info and info.get("pid") != os.getpid() and (info.get("host") != socket.gethostname()
                                                    or _pid_alive(info.get("pid"))):
        raise RunLocked(f"run directory {path.parent} is in use by {_holder(info)} (this file system has no "
                        f"flock; delete {path} if that process is gone)")


def release_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Drop one hold of this process on `run_dir`; the last one removes the lock file and unlocks."""
    run_dir = Path(run_dir).resolve()
    lock = _HELD.get(run_dir)
    if lock is None:
        return
    lock.count -= 1
    if lock.count > 0:
        return
    del _HELD[run_dir]
    try:
        # unlink while still holding the flock: a waiter that opened the old file sees it gone and retries
        if (run_dir / LOCK_NAME).is_file() and os.fstat(lock.fd).st_ino == os.stat(run_dir / LOCK_NAME).st_ino:
            os.unlink(run_dir / LOCK_NAME)
    except OSError:
        pass
    finally:
        os.close(lock.fd)


def lock_of(run_dir: str | os.PathLike[str]) -> RunLock | None:
    """This process's lock on `run_dir`, if it holds one."""
    return _HELD.get(Path(run_dir).resolve())


@atexit.register
def _release_all() -> None:
    for run_dir in list(_HELD):
        _HELD[run_dir].count = 1
        release_run_dir(run_dir)


# -- creating, overwriting, discarding -----------------------------------------------------------------------


def new_run_dir(output_dir: str | Path, name: str, *, overwrite: bool = False, resume: bool = False) -> Path:
    """`<output_dir>/<name>` (or `<name>-2`, `-3`, ... when in use), created and locked for this process.

    `resume`: the existing directory, locked. `overwrite`: an existing run directory is replaced (see the
    module docstring for what is refused). The path returned is absolute.
    """
    check_component(name)
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output_dir {output_dir} is not a directory")
    base = output_dir / name
    if base.is_symlink() and (resume or overwrite):
        raise RunDirError(f"{base} is a symbolic link; tunelab writes and deletes only inside {output_dir}: "
                          "use the directory it points to")
    if resume:
        if not base.is_dir():
            raise RunDirError(f"--resume: run directory {base} does not exist")
        lock_run_dir(base)
        return base
    if base.exists() and overwrite:
        _remove_run_dir(base, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    candidate, i = base, 2
    while True:
        try:
            candidate.mkdir()  # atomic: two processes never get the same new directory
            break
        except FileExistsError:
            candidate, i = base.with_name(f"{name}-{i}"), i + 1
    lock_run_dir(candidate)
    _CREATED.add(candidate.resolve())
    return candidate


def _remove_run_dir(path: Path, output_dir: Path) -> None:
    """`--overwrite`: remove the run directory `path` (checked, locked, renamed away, then deleted)."""
    if not _inside(path, output_dir) or path.resolve().parent != output_dir.resolve():
        raise RunDirError(f"--overwrite: {path} is not inside {output_dir}; refusing to delete it")
    if not is_run_dir(path):
        raise RunDirError(f"--overwrite: {path} is not a tunelab run directory (no recipe.yaml); refusing to delete "
                          "it: choose another name or remove it yourself")
    lock_run_dir(path)  # refuses if another process trains there
    trash = path.with_name(f"{path.name}{OLD_MARK}{os.urandom(4).hex()}")
    try:
        os.rename(path, trash)  # from here on no half-deleted run carries the name
    finally:
        release_run_dir(path)
    shutil.rmtree(trash, ignore_errors=True)


def has_started(run_dir: Path) -> bool:
    """True once a training step was logged or a checkpoint written (the run then holds work to keep)."""
    metrics = Path(run_dir) / METRICS_FILE
    ckpts = Path(run_dir) / CHECKPOINTS_DIR
    return (metrics.is_file() and metrics.stat().st_size > 0) or (ckpts.is_dir() and any(ckpts.iterdir()))


def discard_if_unstarted(run_dir: str | os.PathLike[str]) -> bool:
    """Remove `run_dir` if this process created it and no step has been taken in it; True if removed."""
    run_dir = Path(run_dir).resolve()
    if run_dir not in _CREATED:
        return False
    _CREATED.discard(run_dir)
    if has_started(run_dir):
        return False
    lock = _HELD.pop(run_dir, None)
    trash = run_dir.with_name(f"{run_dir.name}{OLD_MARK}{os.urandom(4).hex()}")
    os.rename(run_dir, trash)
    if lock is not None:
        os.close(lock.fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def keep_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Mark a run directory this process created as holding work to keep before any training step was logged
    (an iterate round's generated samples): a later failure no longer removes it."""
    _CREATED.discard(Path(run_dir).resolve())


@contextmanager
def invocation() -> Iterator[None]:
    """One command's use of run directories: on the way out, release the locks it took; on a failure, also
    remove the directories it created before any step was taken (nothing left behind)."""
    held_before, created_before = set(_HELD), set(_CREATED)
    try:
        yield
    except BaseException:
        for run_dir in set(_CREATED) - created_before:
            discard_if_unstarted(run_dir)
        raise
    finally:
        for run_dir in set(_HELD) - held_before:
            _HELD[run_dir].count = 1
            release_run_dir(run_dir)


# -- metrics and memory ------------------------------------------------------------------------------------


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: max allocated on CUDA, max resident set size on CPU."""
    if device is not None and device.type == "cuda":
        import torch  # here, so that the run-directory helpers load without torch (lock holders, tools)

        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (main process only).

    A process killed mid-append may leave a torn last line; reading skips it, and `truncate_after` (resume)
    rewrites the file without it.
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be torn by a kill; anything else is damage
                    raise RunDirError(f"{self.path}:{i + 1}: not a JSON line") from None
        return out

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint we restart from (and a torn last line)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line, record in self._lines() if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._lines()]
