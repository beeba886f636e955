"""What a sweep optimises: `METRIC:max` / `METRIC:min`, each METRIC read from a finished trial's run directory.

  eval.KEY        the trained model's held-out metric (eval_after.json: exact_match, eval_loss, perplexity, ...)
  before.KEY      the same of the starting point (eval_before.json)
  train.KEY       summary.json of the run: peak_memory_mb, wall_time_s, train_time_s, tokens_per_s,
                  final_train_loss, trainable_params, trainable_pct
  suite.TASK      the primary metric of an `eval.suite` task after training
  forgetting      the mean loss of general ability over the `eval.suite` tasks of category general (before minus
                  after for higher-is-better metrics, after minus before otherwise: positive = forgot), computed
                  from the rows `tunelab report` shows (`track.report.score_rows`, one implementation)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.recipe import RecipeError

TRAIN_KEYS = ("peak_memory_mb", "wall_time_s", "train_time_s", "tokens_per_s", "final_train_loss",
              "trainable_params", "trainable_pct", "steps")
DIRECTIONS = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}


@dataclass(frozen=True)
class SweepObjective:
    metric: str
    direction: str  # "maximize" | "minimize" (Optuna's words)

    @property
    def spec(self) -> str:
        return f"{self.metric}:{self.direction[:3]}"


def parse_objective(text: str) -> SweepObjective:
    metric, sep, direction = str(text).rpartition(":")
    if not sep or direction not in DIRECTIONS or not metric:
        raise RecipeError(f"sweep objective {text!r}: write METRIC:max or METRIC:min, e.g. eval.exact_match:max")
    prefix, _, key = metric.partition(".")
    if metric != "forgetting" and (prefix not in ("eval", "before", "train", "suite") or not key):
        raise RecipeError(f"sweep objective {text!r}: METRIC is eval.KEY, before.KEY, train.KEY, suite.TASK or "
                          "forgetting (docs/sweep.md)")
    if prefix == "train" and key not in TRAIN_KEYS:
        raise RecipeError(f"sweep objective {text!r}: train.KEY is one of {', '.join(TRAIN_KEYS)}")
    return SweepObjective(metric, DIRECTIONS[direction])


def check_against_recipe(objectives: list[SweepObjective], base: Any) -> None:
    """Objectives the base recipe cannot produce are refused before any trial runs."""
    for o in objectives:
        prefix = o.metric.partition(".")[0]
        if prefix in ("eval", "suite", "forgetting") and not base.eval.after:
            raise RecipeError(f"sweep objective {o.spec!r} needs the trained model evaluated: base.eval.after: true")
        if prefix == "before" and not base.eval.before:
            raise RecipeError(f"sweep objective {o.spec!r} needs base.eval.before: true")
        if prefix == "eval" and base.data.eval is None:
            raise RecipeError(f"sweep objective {o.spec!r} needs held-out data: base.data.eval")
        if prefix == "suite" and o.metric.partition(".")[2] not in base.eval.suite:
            raise RecipeError(f"sweep objective {o.spec!r}: {o.metric.partition('.')[2]!r} is not in "
                              f"base.eval.suite ({base.eval.suite})")
        if o.metric == "forgetting" and not (base.eval.suite and base.eval.before):
            raise RecipeError("sweep objective 'forgetting' needs general-ability tasks in base.eval.suite (e.g. "
                              "mc:FILE, ppl:FILE) and base.eval.before: true")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metric_value(run_dir: str | Path, metric: str) -> float | None:
    """The metric of a finished run directory, or None where the run has no such (finite) value."""
    from tunelab.track.report import load_run, score_rows

    run = load_run(run_dir)
    prefix, _, key = metric.partition(".")
    if prefix == "train":
        return _finite(run.summary.get(key))
    if prefix in ("eval", "before"):
        label = "after" if prefix == "eval" else "before"
        return _finite((run.evals.get(f"eval_{label}") or run.summary.get(label) or {}).get(key))
    if prefix == "suite":
        row = next((r for r in score_rows(run) if r["task"] == key), None)
        return row["after"] if row else None
    if metric == "forgetting":
        drops = [(r["before"] - r["after"]) * (1 if r["higher"] else -1) for r in score_rows(run)
                 if r["category"] == "general" and r["before"] is not None and r["after"] is not None]
        return sum(drops) / len(drops) if drops else None
    return None


def available_metrics(run_dir: str | Path) -> list[str]:
    """What a run directory offers, for the error that names a missing metric."""
    from tunelab.track.report import load_run

    run = load_run(run_dir)
    after = run.evals.get("eval_after") or run.summary.get("after") or {}
    names = [f"eval.{k}" for k, v in after.items() if _finite(v) is not None]
    names += [f"train.{k}" for k in TRAIN_KEYS if _finite(run.summary.get(k)) is not None]
    return names
