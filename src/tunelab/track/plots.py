"""Figures of the side-by-side report: matplotlib (Agg backend), returned as base64 PNG strings so the page
embeds them (`<img src="data:image/png;base64,...">`) and stays one self-contained file.

Each function takes plain data (no run-directory reading here) and returns None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import io
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plain(text: object) -> str:
    """`text` as matplotlib shows it literally: `$` starts mathtext (`$\\foo$` is a parse error that aborts the
    figure), so every `$` is escaped; run and task names are data, never markup."""
    return str(text).replace("$", r"\$")


def to_base64(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> str | None:
    """curves: run name -> {"loss": [(step, value)], "eval_loss": [(step, value)]}."""
    if not any(c.get("loss") or c.get("eval_loss") for c in curves.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if c.get("loss"):
            xs, ys = zip(*c["loss"])
            ax.plot(xs, ys, color=color, lw=1.4, label=plain(f"{name} (train)"))
        if c.get("eval_loss"):
            xs, ys = zip(*c["eval_loss"])
            ax.plot(xs, ys, color=color, lw=1.2, ls="--", marker="o", ms=3, label=plain(f"{name} (held-out)"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_base64(fig)


ROUND_PANELS = (("accuracy", "held-out accuracy", 100.0), ("mean_reward", "mean reward of the samples", 1.0),
                ("heldout_loss", "held-out loss", 1.0), ("kept", "samples / pairs kept", 1.0))


def rounds_curves(per_run: dict[str, list[dict[str, Any]]]) -> str | None:
    """per_run: run name -> the rows of its per-round table (`round` 0 = the base model; keys of ROUND_PANELS);
    one panel per quantity any run has, a line per run over the rounds."""
    panels = [p for p in ROUND_PANELS if any(row.get(p[0]) is not None for rows in per_run.values() for row in rows)]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for i, (name, rows) in enumerate(per_run.items()):
            pts = [(row["round"], row[key] * scale) for row in rows if row.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{i % 10}", marker="o", ms=4, lw=1.4, label=plain(name))
        ax.set_xlabel("round (0 = base)")
        ax.set_title(label + (" (%)" if scale == 100.0 else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def r_matrix_heatmap(tasks: list[str], r: list[list[float]], title: str) -> str:
    """R[i][j]: score on task j after training stage i."""
    import numpy as np

    plt = _plt()
    data = np.array(r, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.7 * len(r)))
    im = ax.imshow(data, cmap="viridis", vmin=np.nanmin(data), vmax=np.nanmax(data), aspect="auto")
    ax.set_xticks(range(len(tasks)), [plain(t) for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(r)), [plain(f"after {tasks[i] if i < len(tasks) else i}") for i in range(len(r))],
                  fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] < (np.nanmin(data) + np.nanmax(data)) / 2 else "black")
    ax.set_xlabel("evaluated on")
    ax.set_title(plain(title), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return to_base64(fig)


def quality_vs_memory(points: list[dict[str, Any]], ylabel: str = "task score after") -> str | None:
    """points: [{"name", "memory_mb", "score", "method"}]; only points with both values are drawn."""
    pts = [p for p in points if p.get("memory_mb") is not None and p.get("score") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    methods = sorted({str(p.get("method")) for p in pts})
    for k, m in enumerate(methods):
        sel = [p for p in pts if str(p.get("method")) == m]
        ax.scatter([p["memory_mb"] for p in sel], [p["score"] for p in sel], s=45, color=f"C{k % 10}", label=plain(m))
    for p in pts:
        ax.annotate(plain(p["name"]), (p["memory_mb"], p["score"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("peak memory (MB)")
    ax.set_ylabel(plain(ylabel))
    ax.set_title("Quality vs memory (up and to the left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="method", title_fontsize=8)
    return to_base64(fig)


def diagnostics_plot(per_run: dict[str, list[dict[str, Any]]]) -> str | None:
    """per_run: run name -> diagnostics rows ({"layer", "delta_norm", "intruders", "effective_rank"})."""
    runs = {name: [r for r in rows if r.get("layer") is not None] for name, rows in per_run.items()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    width, top = 0.8 / len(runs), 1
    for k, (name, rows) in enumerate(runs.items()):
        layers = sorted({r["layer"] for r in rows})
        norm = [sum(r["delta_norm"] ** 2 for r in rows if r["layer"] == layer) ** 0.5 for layer in layers]
        changed = [[r for r in rows if r["layer"] == layer and r["delta_norm"] > 0] for layer in layers]
        erank = [sum(r["effective_rank"] for r in c) / len(c) if c else 0.0 for c in changed]
        intr = [sum(r["intruders"] for r in rows if r["layer"] == layer) for layer in layers]
        color = f"C{k % 10}"
        axes[0].plot(layers, norm, marker="o", ms=3, color=color, label=plain(name))
        axes[1].plot(layers, erank, marker="o", ms=3, color=color, label=plain(name))
        axes[2].bar([x + (k - (len(runs) - 1) / 2) * width for x in layers], intr, width=width, color=color,
                    label=plain(name))
        top = max(top, *intr) if intr else top
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("||W - W0||_F per layer", "mean effective rank of the delta",
                                "intruder dimensions per layer")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0, top * 1.15)
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def sweep_front(values: list[list[float]], on_front: list[bool], objectives: list[str],
                names: list[str]) -> str | None:
    """A sweep's trials: one objective = value per trial (the best marked); several = the first objective against
    each other one, non-dominated trials (the Pareto front) filled and labelled, the others hollow."""
    if not values:
        return None
    plt = _plt()
    if len(objectives) == 1:
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        xs = [int(n.lstrip("#")) if n.lstrip("#").isdigit() else i for i, n in enumerate(names)]
        ax.plot(xs, [v[0] for v in values], "o", color="C0", mfc="none", label="trial")
        best = [(x, v[0]) for x, v, f in zip(xs, values, on_front) if f]
        if best:
            ax.plot(*zip(*best), "*", color="C3", ms=13, label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return to_base64(fig)
    pairs = len(objectives) - 1
    fig, axes = plt.subplots(1, pairs, figsize=(5.2 * pairs, 3.8), squeeze=False)
    for k, ax in enumerate(axes[0], start=1):
        for v, f, n in zip(values, on_front, names):
            ax.plot(v[k], v[0], "o", color="C3" if f else "C0", mfc=None if f else "none", ms=7 if f else 6)
            if f:
                ax.annotate(n, (v[k], v[0]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((v[k], v[0]) for v, f in zip(values, on_front) if f)
        if len(front) > 1:
            ax.plot(*zip(*front), "-", color="C3", lw=0.8, alpha=0.6)
        ax.set_xlabel(objectives[k])
        ax.set_ylabel(objectives[0])
        ax.grid(alpha=0.3)
    fig.suptitle("Sweep trials (filled: Pareto front)", fontsize=10)
    fig.tight_layout()
    return to_base64(fig)
