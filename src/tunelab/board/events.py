"""Server-sent events: what changed since the last poll, as `event: NAME\\ndata: JSON\\n\\n` chunks.

One feed per open page. `runs` carries the whole runs table (with statuses and the queue) whenever any row or job
changed; on a run page, `metrics` carries the lines appended to its metrics.jsonl since the last poll (a torn last
line waits for its newline) and `status` its status when it changes. The server polls the files once a second:
the runner needs no channel to the board, and runs started from the CLI show up the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from tunelab.track.follow import JsonlFollower


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


class EventFeed:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], run_dir: Path | None = None,
                 status: Callable[[], str] | None = None, after: int = 0):
        self.snapshot, self.run_dir, self.status = snapshot, run_dir, status
        self._last_runs: str | None = None
        self._last_status: str | None = None
        self._follower = JsonlFollower(run_dir / "metrics.jsonl") if run_dir is not None else None
        self._skip = after  # metrics lines the page already has

    def poll(self) -> list[str]:
        out = []
        snap = json.dumps(self.snapshot(), default=str, sort_keys=True)
        if snap != self._last_runs:
            self._last_runs = snap
            out.append(f"event: runs\ndata: {snap}\n\n")
        if self.run_dir is not None:
            records = self._new_metrics()
            if records:
                out.append(sse("metrics", records))
            if self.status is not None and (s := self.status()) != self._last_status:
                self._last_status = s
                out.append(sse("status", s))
        return out

    def _new_metrics(self) -> list[dict[str, Any]]:
        records = self._follower.new_records()
        if self._skip:
            dropped = min(self._skip, len(records))
            self._skip -= dropped
            records = records[dropped:]
        return records
