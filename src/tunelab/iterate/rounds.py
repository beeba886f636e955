"""The per-round table of an iterate run: one flat row per round (round 0 = the base model), printed at the end,
saved in summary.json (`rounds`), drawn as curves in the HTML report (tunelab.track)."""

from __future__ import annotations

import math
from typing import Any

#: (key, header, format): accuracy = the round's held-out exact match after training; heldout_loss = its held-out
#: loss (for SPIN: -log-likelihood per token of the human responses); mean_reward / sample_accuracy = over the
#: round's samples (the model that generated them: the previous round's); kept = SFT records or pairs.
ROUND_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("round", "round", "d"),
    ("accuracy", "accuracy", "pct"),
    ("heldout_loss", "held-out loss", "f4"),
    ("mean_reward", "mean reward", "f3"),
    ("sample_accuracy", "sample acc", "pct"),
    ("kept", "kept", "d"),
    ("train_loss", "train loss", "f4"),
    ("judge_agreement", "judge agrees", "pct"),
    ("wall_time_s", "time s", "f0"),
    ("status", "status", "s"),
)


def round_row(row: dict[str, Any]) -> dict[str, Any]:
    """A round's record (round.json) -> its flat table row."""
    after = row.get("after") or {}
    samples, data, train = row.get("samples") or {}, row.get("data") or {}, row.get("train") or {}
    return {"round": row["round"], "accuracy": after.get("exact_match"), "heldout_loss": after.get("eval_loss"),
            "mean_reward": samples.get("mean_reward"), "sample_accuracy": samples.get("sample_accuracy"),
            "kept": data.get("kept"), "train_loss": train.get("final_train_loss"),
            "judge_agreement": data.get("judge_agreement"), "wall_time_s": row.get("round_time_s"),
            "status": row.get("status")}


def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "pct":
        return f"{100 * v:.1f}%"
    if fmt.startswith("f"):
        return f"{v:.{fmt[1:]}f}"
    return str(v)


def format_rounds(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table; columns no row has a value for are left out."""
    cols = [(k, h, f) for k, h, f in ROUND_COLUMNS if k in ("round", "status") or any(r.get(k) is not None
                                                                                      for r in rows)]
    cells = [[_cell(r.get(k), f) for k, _, f in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_rounds(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown (docs/iterate.md pastes these)."""
    cols = [(k, h, f) for k, h, f in ROUND_COLUMNS if k in ("round", "status") or any(r.get(k) is not None
                                                                                      for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)
