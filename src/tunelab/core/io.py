"""Atomic writes: every file and directory tunelab produces appears under its final name complete, or not at all.

One pattern, three shapes: write into a temporary sibling (`<name>.tmp-<random>`, same directory, so the
final `rename(2)` stays on one file system and is atomic), flush it, then rename it over the final name.
A crash (even `kill -9`) before the rename leaves the old content untouched plus, at worst, a `*.tmp-*`
orphan that `remove_orphans` deletes on the next start; after the rename the new content is complete.

  * `atomic_file(path)`: a context manager yielding a temporary path for writers that want a file name
    (safetensors, torch.save, numpy, datasets); `atomic_write_text` / `atomic_write_json` on top of it.
  * `atomic_dir(path)`: the same for a whole directory (checkpoints, exports, converted models). An existing
    directory is first renamed away (`<name>.old-<random>`) and deleted only after the new one is in place,
    so there is no moment at which neither exists.

Files are fsync'ed before the rename (the content survives a power cut, not just a killed process).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

TMP_MARK = ".tmp-"  # in the name of every temporary sibling: `<name>.tmp-<8 hex>[suffix]`
OLD_MARK = ".old-"  # a directory being replaced, deleted right after the new one is in place


def _sibling(path: Path, mark: str, suffix: str = "") -> Path:
    return path.with_name(f"{path.name}{mark}{secrets.token_hex(4)}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_remove(path: str | os.PathLike[str]) -> None:
    """Delete a directory (or file) so that its name disappears at once: renamed to `<name>.old-<random>`
    first, then deleted. A crash mid-delete leaves an `.old-` orphan, never a half-deleted `<name>`."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    old = _sibling(path, OLD_MARK)
    os.rename(path, old)
    _remove(old)


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it is fsync'ed and renamed over `path`.

    `suffix` ends the temporary name, for writers that insist on an extension (`np.savez` adds `.npz`
    otherwise). On an exception the temporary file is deleted and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """`obj` as indented JSON (non-JSON values through `str`), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *,
               exists: Literal["replace", "keep", "error"] = "replace") -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path` that becomes `path` on a clean exit.

    `exists` says what happens to a directory already at `path`:
      * "replace": it is renamed away, the new one renamed in, then the old one deleted;
      * "keep": the new one is discarded (another process made the same thing first: a cache);
      * "error": `FileExistsError` before anything is written, unless it is an empty directory.
    On an exception the temporary directory is deleted and `path` is left as it was.
    """
    path = Path(path).absolute()
    if exists == "error" and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and exists == "keep":
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if path.exists() or path.is_symlink():
        old = _sibling(path, OLD_MARK)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:  # put the old one back rather than lose both
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        _remove(old)


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a .safetensors file cannot be loaded (missing, truncated, bad header), or None; reads only its header.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]}},
    then the data; the file must be exactly 8 + N + max(e) bytes long.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated ({size} bytes; the header alone needs {8 + n})"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    if not isinstance(header, dict):
        return "unreadable header (not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"truncated or padded ({size} bytes, its header describes {expected})"
    return None


class NotUtf8(ValueError):
    """A text file that is not UTF-8; the message names file:line and the column of the first bad byte."""


def decode_utf8(raw: bytes, path: str | os.PathLike[str], first_line: int = 1) -> str:
    """`raw` (the text of `path` from line `first_line` on) decoded as UTF-8, or NotUtf8 naming where not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise NotUtf8(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); save the "
                      "file as UTF-8") from None


def read_utf8(path: str | os.PathLike[str]) -> str:
    """A whole text file as UTF-8 (NotUtf8 naming file:line otherwise)."""
    return decode_utf8(Path(path).read_bytes(), path)


def is_temporary(path: Path) -> bool:
    """True for the temporary siblings this module creates (an orphan when no writer is running)."""
    return TMP_MARK in path.name or OLD_MARK in path.name


def remove_orphans(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the `*.tmp-*` / `*.old-*` leftovers of writers killed in `directory` (not recursive); returns them.

    Only call this where no other writer can be at work (the run directory's lock is held).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted(p for p in directory.iterdir() if is_temporary(p))
    for p in found:
        _remove(p)
    return found
