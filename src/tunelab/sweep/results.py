"""A sweep's results: summary.json (the best trial, or the Pareto front of several objectives), report.html (the
trials through `tunelab report`'s tables and plots, the front drawn above them) and the winning recipe.

summary.json:
  {"name", "sweep_dir", "study_name", "storage", "objectives": ["eval.exact_match:max", ...],
   "trials": {"total", "complete", "pruned", "failed", "running"},
   "best": [{"number", "values": {objective: value}, "params", "run_dir", "duration_s"}, ...],
            # one trial for one objective; the non-dominated trials (the Pareto front) for several
   "all": [... every trial, same fields plus "state" ...], "wall_time_s": first trial start to last trial end}
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from tunelab.core.io import atomic_write_json, atomic_write_text
from tunelab.recipe import RecipeError
from tunelab.sweep.spec import SweepRecipe


def _trial_record(t, specs: list[str]) -> dict[str, Any]:
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    return {"number": t.number, "state": t.state.name.lower(),
            "values": dict(zip(specs, t.values)) if t.values is not None else None,
            "params": t.params, "run_dir": t.user_attrs.get("run_dir"), "duration_s": duration,
            **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
            **({"pruned_at_step": t.user_attrs["pruned_at_step"]} if "pruned_at_step" in t.user_attrs else {})}


SKIPPED = "skipped"  # user attr of a trial asked for after another worker reached the budget: not counted


def study_summary(study, sr: SweepRecipe, storage: str, sweep_dir: Path) -> dict[str, Any]:
    from optuna.trial import TrialState

    specs = [o.spec for o in sr.parsed_objectives()]
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIPPED)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        best = []
    elif len(specs) == 1:  # the best (the first of equals)
        best = [study.best_trial]
    else:  # the Pareto front: every non-dominated trial
        best = sorted(study.best_trials, key=lambda t: t.number)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    counts = {s: sum(1 for t in trials if t.state.name.lower() == s) for s in ("complete", "pruned", "fail",
                                                                               "running", "waiting")}
    return {"name": sr.name, "sweep_dir": str(sweep_dir), "study_name": study.study_name, "storage": storage,
            "objectives": specs,
            "trials": {"total": len(trials), "complete": counts["complete"], "pruned": counts["pruned"],
                       "failed": counts["fail"], "running": counts["running"] + counts["waiting"]},
            "best": [_trial_record(t, specs) for t in best],
            "all": [_trial_record(t, specs) for t in trials],
            "wall_time_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None}


def write_results(study, sr: SweepRecipe, sweep_dir: Path, storage: str) -> dict[str, Any]:
    """summary.json and report.html; `storage` is the study's URL as it may be shown (no password)."""
    summary = study_summary(study, sr, storage, sweep_dir)
    atomic_write_json(sweep_dir / "summary.json", summary)
    write_sweep_report(summary, sweep_dir)
    return summary


def front_section(summary: dict[str, Any]) -> str:
    """The report's sweep section: the front (or best) table and its plot."""
    from tunelab.track import plots

    specs = summary["objectives"]
    done = [t for t in summary["all"] if t["values"]]
    best_numbers = {t["number"] for t in summary["best"]}
    img = plots.sweep_front([[t["values"][s] for s in specs] for t in done],
                            [t["number"] in best_numbers for t in done], specs, [f"#{t['number']}" for t in done])
    title = "Pareto front" if len(specs) > 1 else "Best trial"
    rows = "".join(
        "<tr><td>" + html.escape(f"#{t['number']}") + "</td>"
        + "".join(f'<td class="num">{t["values"][s]:.4g}</td>' for s in specs)
        + "<td>" + html.escape(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in t["params"].items())) + "</td></tr>"
        for t in summary["best"])
    n = summary["trials"]
    parts = [f"<h2>Sweep: {html.escape(title)}</h2>",
             f'<p class="small">{n["total"]} trials: {n["complete"]} complete, {n["pruned"]} pruned, {n["failed"]} '
             f'failed, {n["running"]} running or queued. Objectives: {html.escape(", ".join(specs))}.</p>',
             '<table id="front"><thead><tr><th>trial</th>' + "".join(f"<th>{html.escape(s)}</th>" for s in specs)
             + "<th>parameters</th></tr></thead><tbody>" + rows + "</tbody></table>"]
    if img:
        parts.append(f'<img alt="sweep front" src="data:image/png;base64,{img}">')
    return "\n".join(parts)


def write_sweep_report(summary: dict[str, Any], sweep_dir: Path) -> Path:
    """report.html: the front, then `tunelab report` over the trials that finished."""
    from tunelab.track.report import write_report

    runs = [Path(t["run_dir"]) for t in summary["all"] if t.get("run_dir") and Path(t["run_dir"]).is_dir()]
    return write_report(runs, sweep_dir / "report.html", f"tunelab sweep {summary['name']}",
                        extra_sections=[front_section(summary)])


def pick_best(summary: dict[str, Any], number: int | None = None) -> dict[str, Any]:
    """The winning trial: `number` if given, the best of one objective, or of a front the trial best on the first
    objective (ties broken by the next ones)."""
    if number is not None:
        found = [t for t in summary["all"] if t["number"] == number and t["values"]]
        if not found:
            raise RecipeError(f"trial {number} did not complete in this sweep")
        return found[0]
    if not summary["best"]:
        raise RecipeError("no trial of this sweep has completed yet")
    specs = summary["objectives"]
    signs = [-1 if s.endswith(":max") else 1 for s in specs]
    return min(summary["best"], key=lambda t: [sign * t["values"][s] for sign, s in zip(signs, specs)])


def write_best_recipe(sweep_dir: Path, output: Path | None = None, number: int | None = None) -> tuple[Path, dict]:
    """The winning trial's recipe, renamed `<sweep>-best` and pointed back at the base's output directory."""
    import json

    summary_path = sweep_dir / "summary.json"
    if not summary_path.is_file():
        raise RecipeError(f"{sweep_dir} has no summary.json: not a sweep directory, or no trial finished yet")
    summary = json.loads(summary_path.read_text())
    best = pick_best(summary, number)
    recipe = yaml.safe_load((Path(best["run_dir"]) / "recipe.yaml").read_text())
    sweep = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    recipe["name"] = f"{summary['name']}-best"
    recipe["output_dir"] = (sweep.get("base") or {}).get("output_dir", "runs")  # the base's (Recipe's default)
    output = output or sweep_dir / "best_recipe.yaml"
    values = ", ".join(f"{k} = {v:.4g}" for k, v in best["values"].items())
    atomic_write_text(output, f"# tunelab sweep {summary['name']}: trial {best['number']} ({values})\n"
                      + yaml.safe_dump(recipe, sort_keys=False))
    return output, best
