"""The side-by-side report: one self-contained HTML page comparing run directories.

Read from each run directory (each file optional; a missing value shows as '-', a malformed file is named
in the page's notes, never fatal):
  summary.json            method, trainable %, peak memory, tokens/s, wall time, before/after of the run's eval
  eval_before.json / eval_after.json             the runner's held-out loss and exact match
  eval_suite_before.json / eval_suite_after.json `tunelab eval` suite results (task / general / safety)
  metrics.jsonl           loss curves (train loss, held-out loss)
  diagnostics.json        weight diagnostics (tunelab.evaluate.diagnostics)
  summary.json "rounds"   an iterate run's per-round table (round, accuracy, mean reward, kept, train loss, time;
                          "base" = round 0, "columns" = (key, header, format)): a table and curves over rounds
  continual/r_matrix.json {"tasks": [...], "b": [...], "R": [[...]]}: R[i][j] = score on task j after training
                          stage i; b[j] = the base model's score on task j (optional; for forward transfer);
                          checked and summarised by tunelab.evaluate.forgetting (the one implementation)
Figures are matplotlib PNGs embedded as base64 (track/plots.py); a few lines of inline JavaScript make the
table sortable. Nothing is fetched: the page works offline and can be mailed.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.evaluate.forgetting import SUMMARY_KEYS, r_matrix_metrics, validate_r_matrix
from tunelab.track import plots

PERCENT_METRICS = {"exact_match", "stop_rate", "score", "acc", "acc_norm", "refusal_rate", "over_refusal_rate"}


@dataclass
class RunData:
    path: Path
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem -> content
    metrics: list[dict[str, Any]] = field(default_factory=list)
    r_matrix: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: malformed JSON ({e}); ignored")
        return None


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    run = RunData(path, path.name)
    if not path.is_dir():
        run.problems.append(f"{path}: not a directory")
        return run
    run.summary = _read_json(path / "summary.json", run.problems) or {}
    for f in sorted(path.glob("eval_*.json")):
        content = _read_json(f, run.problems)
        if isinstance(content, dict):
            run.evals[f.stem] = content
    mpath = path / "metrics.jsonl"
    if mpath.is_file():
        for lineno, line in enumerate(mpath.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    run.metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    run.problems.append(f"{mpath}:{lineno}: malformed JSON line; skipped")
    rm = _read_json(path / "continual" / "r_matrix.json", run.problems)
    if rm is not None:
        try:
            run.r_matrix = validate_r_matrix(rm, str(path / "continual" / "r_matrix.json"))
        except ValueError as e:
            run.problems.append(f"{e}; ignored")
    diag = _read_json(path / "diagnostics.json", run.problems)
    run.diagnostics = diag if isinstance(diag, dict) and "summary" in diag else None
    if (path / "recipe.yaml").is_file():
        import yaml

        try:
            run.recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            run.problems.append(f"{path / 'recipe.yaml'}: malformed YAML ({e}); ignored")
    return run


# -- what the table shows --------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def score_rows(run: RunData) -> list[dict[str, Any]]:
    """(task, metric, category, higher_is_better, before, after) rows from the runner's and the suite's evals."""
    rows: list[dict[str, Any]] = []
    data = (run.recipe.get("data") or {}).get("eval") or {}
    held_out = f"run eval: {data.get('builtin') or data.get('path') or 'held-out'}"
    for metric, higher in (("exact_match", True), ("stop_rate", True), ("eval_loss", False)):
        b = (run.evals.get("eval_before") or run.summary.get("before") or {}).get(metric)
        a = (run.evals.get("eval_after") or run.summary.get("after") or {}).get(metric)
        if _num(b) is not None or _num(a) is not None:
            rows.append({"task": str(held_out), "metric": metric, "category": "task", "higher": higher,
                         "before": _num(b), "after": _num(a)})
    before = (run.evals.get("eval_suite_before") or {}).get("tasks", {})
    after = (run.evals.get("eval_suite_after") or {}).get("tasks", {})
    for name in list(dict.fromkeys([*before, *after])):
        b, a = before.get(name, {}), after.get(name, {})
        ref = a if "primary" in a else b
        metrics = [(ref.get("primary"), ref.get("higher_is_better", True))]
        if ref.get("kind") == "safety":
            metrics.append(("over_refusal_rate", False))
        for metric, higher in metrics:
            if metric:
                rows.append({"task": name, "metric": metric, "category": ref.get("category", "task"),
                             "higher": bool(higher), "before": _num(b.get(metric)), "after": _num(a.get(metric)),
                             "error": a.get("error") or b.get("error")})
    return rows


def fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric in PERCENT_METRICS:
        return f"{100 * v:.1f}%"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def fmt_delta(row: dict[str, Any]) -> tuple[str, str]:
    """(text, css class) of after - before; class 'good' / 'bad' by the metric's direction."""
    b, a = row["before"], row["after"]
    if a is None or b is None:
        return "-", ""
    d = a - b
    text = f"{100 * d:+.1f} pts" if row["metric"] in PERCENT_METRICS else f"{d:+.4g}"
    if abs(d) < 1e-12:
        return text, ""
    return text, "good" if (d > 0) == row["higher"] else "bad"


def main_row(run: RunData) -> dict[str, Any]:
    s, rows = run.summary, score_rows(run)
    last = run.metrics[-1] if run.metrics else {}
    task = next((r for r in rows if r["category"] == "task" and r["metric"] in ("exact_match", "score")), None)
    return {
        "run": run.name,
        "method": s.get("method") or (run.recipe.get("method") or {}).get("name"),
        "trainable_pct": _num(s.get("trainable_pct")),
        "task": task,
        "general": [r for r in rows if r["category"] == "general"],
        "safety": [r for r in rows if r["category"] == "safety"],
        "peak_memory_mb": _num(s.get("peak_memory_mb")) or _num(max((m.get("memory_mb") or 0 for m in run.metrics),
                                                                     default=None)),
        "tokens_per_s": _num(s.get("tokens_per_s")) or _num(last.get("tokens_per_s")),
        "wall_time_s": _num(s.get("wall_time_s")),
    }


# -- the page -------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f6;cursor:pointer;user-select:none}td.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#137333}.bad{color:#b3261e}.err{color:#b3261e;font-size:12px}.small{font-size:12px;color:#555}
img{max-width:100%;border:1px solid #eee;margin:6px 0}ul.notes{font-size:13px;color:#8a4b00}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    var key = function (r) { var t = r.cells[col].dataset.v || r.cells[col].textContent;
                             var n = parseFloat(t); return isNaN(n) ? t : n; };
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.body.dataset.ready = '1';
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _delta_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    parts = []
    for r in rows:
        if r.get("error") and (r["before"] is None or r["after"] is None):
            parts.append(f'<span class="err">{_e(r["task"])}: error</span>')
            continue
        text, cls = fmt_delta(r)
        parts.append(f'{_e(r["task"])} {_e(r["metric"])}: {fmt(r["before"], r["metric"])} &rarr; '
                     f'{fmt(r["after"], r["metric"])} <span class="{cls}">({_e(text)})</span>')
    return "<br>".join(parts)


def _num_cell(v: float | None, text: str | None = None) -> str:
    return f'<td class="num" data-v="{"" if v is None else v}">{_e(text if text is not None else fmt(v))}</td>'


def runs_table(runs: list[RunData]) -> str:
    head = ["run", "method", "trainable %", "task score (before &rarr; after)", "general ability change",
            "safety change", "peak memory (MB)", "tokens/s", "wall time (s)"]
    out = ['<table id="runs" class="sortable"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for run in runs:
        m = main_row(run)
        t = m["task"]
        task_cell = "-"
        if t:
            text, cls = fmt_delta(t)
            task_cell = (f'{_e(t["task"])}: {fmt(t["before"], t["metric"])} &rarr; {fmt(t["after"], t["metric"])}'
                         + (f' <span class="{cls}">({_e(text)})</span>' if text != "-" else ""))
        pct = m["trainable_pct"]
        out.append(
            f'<tr><td>{_e(m["run"])}</td><td>{_e(m["method"] or "-")}</td>'
            + _num_cell(pct, "-" if pct is None else f"{pct:.3g}")
            + f'<td data-v="{t["after"] if t and t["after"] is not None else ""}">{task_cell}</td>'
            + f'<td>{_delta_list(m["general"])}</td><td>{_delta_list(m["safety"])}</td>'
            + _num_cell(m["peak_memory_mb"], "-" if m["peak_memory_mb"] is None else f'{m["peak_memory_mb"]:,.0f}')
            + _num_cell(m["tokens_per_s"], "-" if m["tokens_per_s"] is None else f'{m["tokens_per_s"]:,.0f}')
            + _num_cell(m["wall_time_s"], "-" if m["wall_time_s"] is None else f'{m["wall_time_s"]:,.1f}')
            + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def scores_table(runs: list[RunData]) -> str:
    out = ['<table id="scores" class="sortable"><thead><tr><th>run</th><th>task</th><th>kind</th><th>metric</th>'
           "<th>before</th><th>after</th><th>change</th></tr></thead><tbody>"]
    n = 0
    for run in runs:
        for r in score_rows(run):
            text, cls = fmt_delta(r)
            err = f'<div class="err">{_e(r["error"])}</div>' if r.get("error") else ""
            out.append(f'<tr><td>{_e(run.name)}</td><td>{_e(r["task"])}{err}</td><td>{_e(r["category"])}</td>'
                       f'<td>{_e(r["metric"])}{"" if r["higher"] else " (lower is better)"}</td>'
                       + _num_cell(r["before"], fmt(r["before"], r["metric"]))
                       + _num_cell(r["after"], fmt(r["after"], r["metric"]))
                       + f'<td class="num {cls}">{_e(text)}</td></tr>')
            n += 1
    out.append("</tbody></table>")
    return "\n".join(out) if n else '<p class="small">No evaluation results found.</p>'


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _round_cell(v: Any, form: str) -> str:
    v = _num(v) if not isinstance(v, str) else v
    if v is None:
        return "-"
    if isinstance(v, str):
        return _e(v)
    return f"{100 * v:.1f}%" if form == "pct" else f"{v:.{form[1:]}f}" if form.startswith("f") else f"{v:g}"


def rounds_section(runs: list[RunData]) -> list[str]:
    """Iterate runs (summary.json with "rounds"): curves over rounds and each run's per-round table."""
    its = [r for r in runs if isinstance(r.summary.get("rounds"), list) and r.summary["rounds"]]
    if not its:
        return []
    rows = {r.name: ([r.summary["base"]] if isinstance(r.summary.get("base"), dict) else []) + r.summary["rounds"]
            for r in its}
    parts = ["<h2>Self-improvement rounds</h2>", _img(plots.rounds_curves(rows), "rounds")]
    for r in its:
        cols = [c for c in r.summary.get("columns") or [] if isinstance(c, list) and len(c) == 3]
        cols = [c for c in cols if any(row.get(c[0]) is not None for row in rows[r.name])]
        head = "".join(f"<th>{_e(h)}</th>" for _, h, _ in cols)
        body = "".join("<tr>" + "".join(f"<td>{_round_cell(row.get(k), f)}</td>" for k, _, f in cols) + "</tr>"
                       for row in rows[r.name])
        parts.append(f"<h3>{_e(r.name)}: {_e(r.summary.get('strategy', ''))}</h3><table><thead><tr>{head}</tr>"
                     f"</thead><tbody>{body}</tbody></table>")
    return parts


def render_report(run_dirs: list[str | Path], title: str = "tunelab report",
                  extra_sections: list[str] | None = None) -> str:
    """The page. `extra_sections`: HTML fragments placed before the runs table (a sweep's front)."""
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same name from different parents: tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">{len(runs)} run(s): {", ".join(_e(r.path) for r in runs)}. Generated '
             f'{datetime.datetime.now().isoformat(timespec="seconds")}.</p>',
             *(extra_sections or []), "<h2>Runs</h2>", runs_table(runs),
             '<p class="small">Changes are after &minus; before; green is better, red worse. Click a column to '
             "sort.</p>", "<h2>Task scores</h2>", scores_table(runs)]
    curves = {r.name: {key: [(m["step"], m[key]) for m in r.metrics
                             if _num(m.get("step")) is not None and _num(m.get(key)) is not None]
                       for key in ("loss", "eval_loss")} for r in runs}
    loss_png = plots.loss_curves(curves)
    parts += ["<h2>Loss curves</h2>", _img(loss_png, "loss curves") or '<p class="small">No metrics.jsonl.</p>']
    points = []
    for r in runs:
        m = main_row(r)
        points.append({"name": r.name, "method": m["method"], "memory_mb": m["peak_memory_mb"],
                       "score": m["task"]["after"] if m["task"] else None})
    scatter = plots.quality_vs_memory(points)
    parts += ["<h2>Quality vs memory</h2>",
              _img(scatter, "quality vs memory") or '<p class="small">Needs a task score and peak memory.</p>']
    continual = [r for r in runs if r.r_matrix]
    if continual:
        parts.append("<h2>Continual learning: R matrices</h2>")
        for r in continual:
            rm = r.r_matrix
            met = r_matrix_metrics(rm)
            parts.append(_img(plots.r_matrix_heatmap(rm["tasks"], rm["R"], f"{r.name}: R[i][j]"), f"R {r.name}"))
            parts.append('<p class="small">' + ", ".join(f"{k} = {fmt(met.get(k))}" for k in SUMMARY_KEYS)
                         + "</p>")
    parts += rounds_section(runs)
    diag = {r.name: r.diagnostics["matrices"] for r in runs if r.diagnostics}
    if diag:
        parts += ["<h2>Weight diagnostics</h2>", _img(plots.diagnostics_plot(diag), "diagnostics")]
        rows = "".join(f"<tr><td>{_e(n)}</td>" + "".join(_num_cell(_num(r.diagnostics["summary"].get(k)))
                                                          for k in ("total_delta_norm", "mean_rel_delta",
                                                                    "mean_effective_rank", "intruders_total"))
                       + "</tr>" for n, r in ((r.name, r) for r in runs if r.diagnostics))
        parts.append('<table id="diagnostics"><thead><tr><th>run</th><th>||&Delta;W||</th><th>mean relative '
                     "&Delta;</th><th>mean effective rank</th><th>intruder dimensions</th></tr></thead><tbody>"
                     + rows + "</tbody></table>")
    problems = [p for r in runs for p in r.problems]
    if problems:
        parts.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + f"\n<script>{JS}</script>\n</body></html>\n")


def write_report(run_dirs: list[str | Path], output: str | Path, title: str = "tunelab report",
                 extra_sections: list[str] | None = None) -> Path:
    from tunelab.core.io import atomic_write_text

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, render_report(run_dirs, title, extra_sections))
    output.chmod(0o644)  # a page to share, not a secret
    return output


# -- headless browser (tests and screenshots) ------------------------------------------------------


def find_chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def open_in_chromium(page: str | Path, *, screenshot: str | Path | None = None, size: tuple[int, int] = (1280, 2400),
                     timeout: float = 120.0) -> tuple[str, list[str]]:
    """Load `page` in headless Chromium: (the DOM after scripts ran, console messages). With `screenshot`, also
    write a PNG of the top `size` pixels of the page."""
    import subprocess
    import tempfile

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install chromium)")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="tunelab-chromium-") as profile:
        base = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
                f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}"]
        run = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"chromium failed ({run.returncode}): {run.stderr[-2000:]}")
        console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
        if screenshot is not None:
            shot = subprocess.run([*base, f"--screenshot={Path(screenshot).resolve()}", url], capture_output=True,
                                  text=True, timeout=timeout)
            if shot.returncode != 0 or not Path(screenshot).is_file():
                raise RuntimeError(f"chromium screenshot failed ({shot.returncode}): {shot.stderr[-2000:]}")
    return run.stdout, console
