"""A run's evaluation: held-out metrics and the `eval.suite` tasks of a model, saved in the run directory, and the
before/after table `tunelab run` prints."""

from __future__ import annotations

import time
from typing import Any

from tunelab.core.rundir import write_json
from tunelab.runner.workspace import Workspace


def evaluate(ws: Workspace, model, label: str) -> dict[str, Any]:
    """Held-out metrics of `model` on the run's eval data (`tunelab.evaluate.heldout`, with the run's objective
    and reference for preference pairs), plus the `eval.suite` tasks' primary metrics under "suite" (full results
    in eval_suite_<label>.json); saved as eval_<label>.json."""
    from tunelab.evaluate.heldout import HeldOutSettings, heldout_metrics

    t0 = time.perf_counter()
    ev = ws.recipe.eval
    settings = HeldOutSettings(batch_size=ev.batch_size, precision=ws.recipe.train.precision,
                               max_new_tokens=ev.max_new_tokens, device=ws.accelerator.device)
    results: dict[str, Any] = {"label": label}
    results.update(heldout_metrics(model, ws.tokenizer, ws.eval_data, ws.eval_items, settings, objective=ws.objective,
                                   ref=ws.ref))
    if ev.suite:
        results["suite"] = evaluate_suite(ws, model, label)
    results["eval_time_s"] = time.perf_counter() - t0
    if ws.accelerator.is_main_process:
        write_json(ws.run_dir, f"eval_{label}.json", results)
    return results


def evaluate_suite(ws: Workspace, model, label: str) -> dict[str, float | None]:
    """`eval.suite` on `model`, written as eval_suite_<label>.json (the layout `tunelab eval` writes, which
    `tunelab report` reads); returns {task: primary metric} for the run's table. A failing task is recorded
    with its error and costs only itself."""
    from tunelab.evaluate.suite import SuiteSettings, run_suite, suite_record

    ev, t0 = ws.recipe.eval, time.perf_counter()
    settings = SuiteSettings(n=ev.suite_n, batch_size=ev.batch_size, precision=ws.recipe.train.precision,
                             max_new_tokens=ev.max_new_tokens)
    suite = run_suite(model, ws.tokenizer, list(ev.suite), settings, data_cfg=ws.recipe.data)
    if ws.accelerator.is_main_process:
        write_json(ws.run_dir, f"eval_suite_{label}.json", suite_record(
            str(ws.run_dir), label, ws.recipe.model.name_or_path, label == "before", suite, time.perf_counter() - t0))
    return {name: (r.get(r.get("primary", "")) if "error" not in r else None) for name, r in suite["tasks"].items()}


TABLE_ROWS = (  # (key in eval_<label>.json, label, shown as a percentage)
    ("exact_match", "exact match", True),
    ("stop_rate", "stop rate", True),
    ("reward_accuracy", "reward accuracy", True),
    ("preference_accuracy", "preference accuracy", True),
    ("rewards/margins", "reward margin", False),
    ("logps/chosen", "log-prob chosen", False),
    ("logps/rejected", "log-prob rejected", False),
    ("eval_loss", "held-out loss", False),
    ("perplexity", "perplexity", False),
)


def format_table(before: dict | None, after: dict | None) -> str:
    rows = []
    for key, label, pct in TABLE_ROWS:
        b = before.get(key) if before else None
        a = after.get(key) if after else None
        if b is None and a is None:
            continue
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
        rows.append((label, fmt(b) if b is not None else "-", fmt(a) if a is not None else "-"))
    suite_b, suite_a = (before or {}).get("suite") or {}, (after or {}).get("suite") or {}
    for name in dict.fromkeys([*suite_b, *suite_a]):
        b, a = suite_b.get(name), suite_a.get(name)
        rows.append((name, f"{b:.4f}" if b is not None else "-", f"{a:.4f}" if a is not None else "-"))
    if not rows:
        return "(no evaluation)"
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'before':>10}  {'after':>10}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}" for r in rows]
    return "\n".join(lines)
