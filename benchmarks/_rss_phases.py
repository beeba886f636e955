"""Where a process's resident memory goes, phase by phase (`benchmarks/grpo.py --phases`).

A daemon thread samples VmRSS from /proc/self/status every few milliseconds; `mark(name)` starts a phase. Each
visit of a phase records the RSS it started at and the largest RSS sampled during it. Memory figures do not
depend on the machine's load, so this runs outside the measurement queue; the sampling itself costs ~1% of a core.
"""

from __future__ import annotations

import threading
import time

from _common import rss_mb


class Phases:
    def __init__(self, interval_s: float = 0.005):
        self.visits: list[list] = []  # [name, start s, RSS at start, peak RSS]
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self.mark("start")
        threading.Thread(target=self._run, args=(interval_s,), daemon=True).start()

    def mark(self, name: str) -> None:
        r = rss_mb()
        with self._lock:
            if self.visits:
                self.visits[-1][3] = max(self.visits[-1][3], r)
            if not self.visits or self.visits[-1][0] != name:
                self.visits.append([name, time.perf_counter() - self.t0, r, r])

    def _run(self, interval_s: float) -> None:
        while True:
            r = rss_mb()
            with self._lock:
                self.visits[-1][3] = max(self.visits[-1][3], r)
            time.sleep(interval_s)

    def wrap(self, owner, attr: str, name: str, after: str | None = None) -> None:
        """Mark `name` while `owner.attr` runs (and `after` once it returns)."""
        inner = getattr(owner, attr)

        def wrapped(*a, **k):
            self.mark(name)
            try:
                return inner(*a, **k)
            finally:
                if after:
                    self.mark(after)

        setattr(owner, attr, wrapped)

    def hook_training(self) -> None:
        """backward, the optimizer step, and the update's forward between them (both libraries use these)."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *a: self.mark("optimizer step"))
        register_optimizer_step_post_hook(lambda *a: self.mark("update forward"))
        self.wrap(torch.autograd, "backward", "backward", after="update forward")

    def rows(self) -> list[dict]:
        with self._lock:
            return [{"phase": n, "t_s": round(t, 1), "rss_start_mb": round(a), "rss_peak_mb": round(b)}
                    for n, t, a, b in self.visits]


def print_phases(name: str, rows: list[dict]) -> None:
    print(f"{name}: RSS per phase (MB, in order; the first visit of a phase that sets the peak is marked *)")
    peak = max(r["rss_peak_mb"] for r in rows)
    marked = False
    for r in rows:
        star = "*" if r["rss_peak_mb"] == peak and not marked else ""
        marked = marked or bool(star)
        print(f"  {r['t_s']:8.1f} s  {r['phase']:18} start {r['rss_start_mb']:6}  peak {r['rss_peak_mb']:6} {star}")
