"""Following a growing JSON-lines file (a run's metrics.jsonl) from another process: the sweep's pruning watch and
the board's live curves read each line once, as the loop appends it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlFollower:
    """`new_records()`: the complete lines appended since the last call, parsed (a torn last line waits for its
    newline; malformed lines are skipped). A file rewritten shorter (a resumed run truncates its metrics to the
    checkpoint) is read again from its start."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
