"""The evaluation suite: named tasks of several kinds, each run on its own; a failing task costs only itself.

Task specs (`tunelab eval ... --tasks a,b,c`):
  date_format, arithmetic, ...   a built-in task: greedy generation scored by the task's checker   [task]
  gen:FILE.jsonl                 user generation items with reference + checker (evaluate/checkers.py) [task]
  mc:FILE.jsonl                  multiple choice by log-likelihood (evaluate/multiple_choice.py)  [general]
  ppl:FILE                       perplexity / bits per byte, sliding window (evaluate/perplexity.py) [general]
  safety  or  safety:FILE        refusal / over-refusal rates (evaluate/safety.py)                 [safety]
  FILE                           kind guessed from the file: .txt/.raw or {"text"} -> ppl, question+choices
                                 -> mc, reference/answer -> gen
lm-eval tasks run through `harness` (evaluate/harness.py) and are stored as "harness:<task>" [general].

Every result records its kind, category (task / general / safety), the metric that summarises it (`primary`,
with `higher_is_better`) and its time. A task that raises is recorded as {"error": "..."}; the others still
run, and `failed` lists the failures (the CLI then exits non-zero).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import DataError

log = logging.getLogger("tunelab")

# kind -> (category, primary metric, higher is better)
KINDS: dict[str, tuple[str, str, bool]] = {
    "builtin": ("task", "score", True),
    "gen": ("task", "score", True),
    "mc": ("general", "acc_norm", True),
    "ppl": ("general", "bits_per_byte", False),
    "safety": ("safety", "refusal_rate", True),
    "harness": ("general", "acc", True),
}


@dataclass
class SuiteSettings:
    n: int = 100  # items per task (generation, multiple choice, prompts per safety list)
    batch_size: int = 16
    max_new_tokens: int = 24  # generation tasks
    precision: str = "auto"
    checker: str = "exact"  # default checker of gen: files whose lines name none
    ppl_max_chars: int | None = 100_000  # score this prefix of a text file; None = all of it
    ppl_max_length: int | None = None  # window (tokens); None = the model's, at most 1024
    ppl_stride: int | None = None  # None = half the window
    harmful: str | None = None  # harmful prompts file (default: the shipped list)
    benign: str | None = None  # benign prompts file (default: the shipped list)
    detector: str | None = None  # refusal detector: "phrases" or "module:callable"
    safety_max_new_tokens: int = 48
    harness_include: str | None = None
    harness_limit: int | None = None
    progress: bool = True


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _guess_kind(path: str) -> str:
    from tunelab.evaluate.checkers import iter_jsonl

    p = Path(path)
    inner = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    if inner in (".txt", ".raw", ".text"):
        return "ppl"
    if inner == ".jsonl":
        for _, obj in iter_jsonl(p):
            if "choices" in obj or isinstance(obj.get("question"), dict):
                return "mc"
            if "reference" in obj or "answer" in obj:
                return "gen"
            if "text" in obj:
                return "ppl"
            break
    raise DataError(f"{path}: cannot tell what kind of eval file this is; prefix it with gen:, mc:, ppl: or safety:")


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """(name, kind, path or task) of one task spec."""
    from tunelab.data.builtin import list_tasks

    spec = spec.strip()
    builtin = {t.name for t in list_tasks()}
    if spec in builtin:
        return spec, "builtin", spec
    if spec == "safety":
        return "safety", "safety", None
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("gen", "mc", "ppl", "safety") and rest:
        return f"{kind}:{_short(rest)}", kind, rest
    if sep and kind == "harness" and rest:
        return spec, "harness", rest
    if Path(spec).exists():
        kind = _guess_kind(spec)
        return f"{kind}:{_short(spec)}", kind, spec
    raise DataError(f"unknown eval task {spec!r}: not a built-in task ({', '.join(sorted(builtin))}), "
                    "not 'safety', not KIND:FILE (gen, mc, ppl, safety) and not an existing file")


def run_task(model, tokenizer, kind: str, arg: str | None, s: SuiteSettings, data_cfg=None) -> dict[str, Any]:
    common = dict(batch_size=s.batch_size, precision=s.precision, progress=s.progress)
    if kind == "builtin":
        from tunelab.data.pipeline import eval_items
        from tunelab.evaluate.tasks import exact_match
        from tunelab.recipe import DataConfig, DatasetSpec

        items = eval_items(DatasetSpec(builtin=arg, split="eval", n=s.n), data_cfg or DataConfig())
        out = exact_match(model, tokenizer, items, max_new_tokens=s.max_new_tokens, **common)
        out["score"] = out.pop("exact_match")
        return out
    if kind == "gen":
        from tunelab.data.pipeline import EvalItem
        from tunelab.evaluate.checkers import get_checker, load_generation_file
        from tunelab.evaluate.tasks import exact_match

        gen = load_generation_file(arg, s.checker, s.n)
        items = [EvalItem(g.messages, g.reference) for g in gen]
        out = exact_match(model, tokenizer, items, max_new_tokens=s.max_new_tokens,
                          checks=[get_checker(g.checker) for g in gen], **common)
        out["score"] = out.pop("exact_match")
        return out
    if kind == "mc":
        from tunelab.evaluate.multiple_choice import load_mc_file, multiple_choice

        return multiple_choice(model, tokenizer, load_mc_file(arg, s.n), **common)
    if kind == "ppl":
        from tunelab.evaluate.perplexity import load_text, perplexity

        return perplexity(model, tokenizer, load_text(arg, s.ppl_max_chars), max_length=s.ppl_max_length,
                          stride=s.ppl_stride, batch_size=max(1, s.batch_size // 4), precision=s.precision,
                          progress=s.progress)
    if kind == "safety":
        from tunelab.evaluate.safety import BENIGN_PROMPTS, HARMFUL_PROMPTS, load_detector, load_prompts, safety_eval

        harmful_file = arg or s.harmful
        harmful = load_prompts(harmful_file, s.n) if harmful_file else list(HARMFUL_PROMPTS[: s.n])
        benign = load_prompts(s.benign, s.n) if s.benign else list(BENIGN_PROMPTS[: s.n])
        out = safety_eval(model, tokenizer, harmful=harmful, benign=benign, detector=load_detector(s.detector),
                          max_new_tokens=s.safety_max_new_tokens, **common)
        out.update(harmful_source=harmful_file or "shipped", benign_source=s.benign or "shipped")
        return out
    raise ValueError(f"unknown task kind {kind!r}")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run_suite(model, tokenizer, specs: list[str], settings: SuiteSettings | None = None, *,
              harness: list[str] | None = None, data_cfg=None) -> dict[str, Any]:
    """Run every task; returns {"tasks": {name: result}, "failed": [names], "settings": {...}}."""
    s = settings or SuiteSettings()
    tasks: dict[str, dict[str, Any]] = {}
    for spec in specs:
        t0 = time.perf_counter()
        try:
            name, kind, arg = parse_spec(spec)
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            tasks[spec] = {"kind": "unknown", "error": _error(e), "time_s": 0.0}
            log.error("eval task %s failed: %s", spec, _error(e))
            continue
        if kind == "harness":
            harness = [*(harness or []), arg]
            continue
        category, primary, higher = KINDS[kind]
        entry: dict[str, Any] = {"kind": kind, "category": category, "source": arg, "primary": primary,
                                 "higher_is_better": higher}
        try:
            entry.update(run_task(model, tokenizer, kind, arg, s, data_cfg))
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            entry["error"] = _error(e)
            log.error("eval task %s failed: %s", name, entry["error"])
            log.debug("%s", traceback.format_exc())
        entry["time_s"] = time.perf_counter() - t0
        tasks[name] = entry
    if harness:
        tasks.update(_run_harness_tasks(model, tokenizer, harness, s))
    failed = [name for name, r in tasks.items() if "error" in r]
    return {"tasks": tasks, "failed": failed, "settings": asdict(s)}


def suite_record(target: str, label: str, model: str, base: bool, suite: dict[str, Any],
                 wall_time_s: float) -> dict[str, Any]:
    """The eval_suite_<label>.json layout that `tunelab eval` and a recipe's `eval.suite` write and
    `tunelab report` reads: what was evaluated, when, and `run_suite`'s tasks / failed / settings."""
    import datetime

    return {"target": target, "label": label, "model": model, "base": base,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **suite, "wall_time_s": wall_time_s}


def _run_harness_tasks(model, tokenizer, names: list[str], s: SuiteSettings) -> dict[str, dict[str, Any]]:
    from tunelab.evaluate.harness import lm_eval_version, run_harness

    t0 = time.perf_counter()
    out: dict[str, dict[str, Any]] = {}
    try:
        res = run_harness(model, tokenizer, names, include_path=s.harness_include, limit=s.harness_limit,
                          batch_size=s.batch_size)
    except Exception as e:  # noqa: BLE001
        log.error("lm-eval tasks %s failed: %s", names, _error(e))
        return {f"harness:{n}": {"kind": "harness", "category": "general", "error": _error(e),
                                 "lm_eval_version": lm_eval_version(), "time_s": time.perf_counter() - t0}
                for n in names}
    for task, metrics in res["metrics"].items():
        primary = next((m for m in ("acc_norm", "acc", "exact_match", "word_perplexity") if m in metrics),
                       next(iter(metrics), None))
        out[f"harness:{task}"] = {
            "kind": "harness", "category": "general", "source": task, "primary": primary,
            "higher_is_better": primary != "word_perplexity", **metrics,
            "lm_eval_version": res["lm_eval_version"], "task_version": res["versions"].get(task),
            "n-shot": res["n-shot"].get(task), "n-samples": res["n-samples"].get(task),
            "config": res["configs"].get(task), "time_s": time.perf_counter() - t0,
        }
    return out


def format_results(results: dict[str, Any]) -> str:
    """A short table: task, kind, primary metric, value (or the error)."""
    lines = []
    for name, r in results.get("tasks", {}).items():
        if "error" in r:
            lines.append(f"{name:<40} {r.get('kind', ''):<8} ERROR {r['error']}")
            continue
        value = r.get(r.get("primary") or "", None)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        lines.append(f"{name:<40} {r['kind']:<8} {r.get('primary') or '-':<16} {shown}")
    return "\n".join(lines)
