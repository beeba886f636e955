"""Continual-learning metrics over the R matrix: the one implementation (`tunelab report` uses it too).

R[t][i] is the score on task i after training stage t (stage t trains task t; rows = stages, columns =
tasks; None = not measured); b[i] is the score on task i before any training. With k completed stages
(k rows; k = T once the stream is done) the metrics are taken over the k x k block of the tasks seen so far:

  ACC  average accuracy       (1/k) sum_i R[k-1][i]
  BWT  backward transfer      (1/(k-1)) sum_{i<k-1} (R[k-1][i] - R[i][i])        Lopez-Paz & Ranzato 2017
  FWT  forward transfer       (1/(k-1)) sum_{i>=1} (R[i-1][i] - b[i])            (GEM, arXiv:1706.08840)
  BWT_T, FWT_T                the same sums divided by k: what the GEM code prints (its per-task vectors
                              have a zero entry for the task that has no term, and it takes their mean)
  forgetting                  per task i < k-1: R[i][i] - R[k-1][i]   (score just after learning it - final)
  forgetting_max              per task i < k-1: max_{l<k-1} R[l][i] - R[k-1][i]   (Chaudhry et al. 2018,
                              RWalk, arXiv:1801.10112: best earlier score - final); averages over i < k-1
Entries that are None are left out of sums and their divisors.

General-ability retention (`general_retention`) compares the general metrics before training (perplexity /
bits per byte, multiple-choice accuracy) with those after the last stage.

The file format (continual/r_matrix.json, drawn by `tunelab report`):
  {"tasks": [...], "b": [...] | null, "R": [[...], ...], "joint": [...]?, "general": {...}?, "metrics": {...}?}
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

Row = Sequence[float | None]
Divisor = Literal["T-1", "T"]

#: the scalar metrics a table or report shows, in order
SUMMARY_KEYS = ("ACC", "BWT", "FWT", "forgetting", "forgetting_max")


def _mean(values: list[float], divisor: int | None = None) -> float | None:
    if not values:
        return None
    return sum(values) / (divisor if divisor is not None else len(values))


def _ok(*vals: float | None) -> bool:
    return all(v is not None for v in vals)


def _k(r: Sequence[Row]) -> int:
    if not r:
        raise ValueError("the R matrix has no rows (no stage completed)")
    return len(r)


def average_accuracy(r: Sequence[Row]) -> float | None:
    """Mean score over the k tasks seen after the last of the k completed stages."""
    k = _k(r)
    return _mean([v for v in r[k - 1][:k] if v is not None])


def backward_transfer(r: Sequence[Row], divisor: Divisor = "T-1") -> float | None:
    """sum_{i<k-1} (R[k-1][i] - R[i][i]) / (k-1), or / k with divisor "T" (GEM code). Negative = forgetting."""
    k = _k(r)
    terms = [r[k - 1][i] - r[i][i] for i in range(k - 1) if _ok(r[k - 1][i], r[i][i])]
    if k < 2 or not terms:
        return None
    return _mean(terms, len(terms) if divisor == "T-1" else len(terms) + 1)


def forward_transfer(r: Sequence[Row], b: Row, divisor: Divisor = "T-1") -> float | None:
    """sum_{i>=1} (R[i-1][i] - b[i]) / (k-1), or / k with divisor "T": what earlier stages did to a task
    before it was trained, against the untrained model."""
    k = _k(r)
    if b is None:
        return None
    terms = [r[i - 1][i] - b[i] for i in range(1, k) if i < len(r[i - 1]) and _ok(r[i - 1][i], b[i])]
    if k < 2 or not terms:
        return None
    return _mean(terms, len(terms) if divisor == "T-1" else len(terms) + 1)


def forgetting(r: Sequence[Row], variant: Literal["just_after", "max"] = "just_after") -> list[float | None]:
    """Per task i < k-1: (score just after learning it, or the best score of any earlier stage) - final score."""
    k = _k(r)
    out: list[float | None] = []
    for i in range(k - 1):
        final = r[k - 1][i]
        if variant == "just_after":
            ref = r[i][i]
        else:
            earlier = [r[s][i] for s in range(k - 1) if r[s][i] is not None]
            ref = max(earlier) if earlier else None
        out.append(ref - final if _ok(ref, final) else None)
    return out


def general_retention(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """Per general task: its primary metric before and after, the change (after - before) and the ratio
    after/before. Each entry of `before`/`after` is a suite result: {"primary": metric, metric: value,
    "higher_is_better": bool}. `retained` is the ratio oriented so that 1.0 = unchanged and below 1 = lost
    (before/after for metrics where lower is better, such as bits per byte)."""
    out: dict[str, dict] = {}
    for name, a in after.items():
        b = before.get(name) or {}
        metric = a.get("primary") or b.get("primary")
        vb, va = b.get(metric), a.get(metric)
        if not isinstance(vb, (int, float)) or not isinstance(va, (int, float)):
            continue
        higher = a.get("higher_is_better", True)
        retained = None
        if higher and vb:
            retained = va / vb
        elif not higher and va:
            retained = vb / va
        out[name] = {"metric": metric, "before": vb, "after": va, "change": va - vb, "higher_is_better": higher,
                     "retained": retained}
    return out


def validate_r_matrix(rm: Any, where: str) -> dict[str, Any]:
    """Check the continual/r_matrix.json shape; raises ValueError naming the problem."""
    if not isinstance(rm, dict) or not isinstance(rm.get("tasks"), list) or not isinstance(rm.get("R"), list):
        raise ValueError(f"{where}: expected {{\"tasks\": [...], \"R\": [[...]], \"b\"?: [...]}}")
    n = len(rm["tasks"])
    if len(rm["R"]) > n:
        raise ValueError(f"{where}: R has {len(rm['R'])} rows for {n} tasks")
    for i, row in enumerate(rm["R"]):
        if not isinstance(row, list) or len(row) != n:
            raise ValueError(f"{where}: R[{i}] must be a list of {n} numbers (one per task)")
        if not all(v is None or isinstance(v, (int, float)) for v in row):
            raise ValueError(f"{where}: R[{i}] holds a value that is not a number or null")
    for key in ("b", "joint"):
        if rm.get(key) is not None and (not isinstance(rm[key], list) or len(rm[key]) != n):
            raise ValueError(f"{where}: {key} must be a list of {n} numbers")
    return rm


def r_matrix_metrics(rm: dict[str, Any]) -> dict[str, Any]:
    """Every metric of an R-matrix document (see the module docstring); values are None where undefined."""
    r, b, tasks = rm["R"], rm.get("b"), rm["tasks"]
    if not r:
        return {k: None for k in SUMMARY_KEYS}
    k = len(r)
    f_after, f_max = forgetting(r, "just_after"), forgetting(r, "max")
    out: dict[str, Any] = {
        "ACC": average_accuracy(r),
        "BWT": backward_transfer(r, "T-1"),
        "FWT": forward_transfer(r, b, "T-1"),
        "forgetting": _mean([v for v in f_after if v is not None]),
        "forgetting_max": _mean([v for v in f_max if v is not None]),
        "BWT_T": backward_transfer(r, "T"),
        "FWT_T": forward_transfer(r, b, "T"),
        "forgetting_per_task": dict(zip(tasks, f_after)),
        "forgetting_max_per_task": dict(zip(tasks, f_max)),
        "stages_completed": k,
    }
    joint = rm.get("joint")
    if joint is not None:
        out["joint_ACC"] = _mean([v for v in joint[:k] if v is not None])
    return out
