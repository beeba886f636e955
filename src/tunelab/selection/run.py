"""Selection end to end: records -> examples -> checks -> dedup -> scores (cached) -> selector -> subset + report.

`select_records` is the library function; `select_file` is what `tunelab select` calls (writes the subset
in the input's own record format, with the scores as an extra field, and a report directory);
`encode_selected` is what a recipe's `data.select:` runs before training (in `runner.open_workspace`).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.core.io import atomic_file, atomic_write_json
from tunelab.data.formats import DataError, Record, detect_format, load_records, to_example
from tunelab.recipe import RecipeError
from tunelab.recipe.select import SelectConfig
from tunelab.selection.cache import ScoreCache, cache_key, data_hash
from tunelab.selection.context import ScoringContext
from tunelab.selection.dedup import deduplicate
from tunelab.selection.registry import (
    Pool,
    ScoreOutput,
    Scorer,
    SelectionError,
    build_scorer,
    build_selector,
    resolve_budget,
    validate_select_config,
)
from tunelab.selection.report import build_report, plot_histograms

log = logging.getLogger("tunelab")

SCORE_FIELD = "select_scores"  # the extra field each written record carries
MAX_LISTED = 20  # bad records listed by origin in one error


@dataclass
class SelectionResult:
    indices: list[int]  # positions of the selected records among those read, in file order
    records: list[Record]  # the selected records, each with its scores in data[SCORE_FIELD]
    report: dict[str, Any] = field(default_factory=dict)


def _fail_listing(problems: list[tuple[str, str]], what: str) -> None:
    if not problems:
        return
    lines = [f"  {origin}: {why}" for origin, why in problems[:MAX_LISTED]]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise SelectionError(f"{len(problems)} record(s) {what}:\n" + "\n".join(lines) + more)


def to_examples(records: list[Record], fmt: str = "auto", system_prompt: str | None = None) -> list:
    """Every record converted; ALL failures are reported at once, each with its file:line."""
    if not records:
        raise SelectionError("no records to select from")
    fmt = detect_format(records[0].data) if fmt == "auto" else fmt
    examples, problems = [], []
    for r in records:
        try:
            examples.append(to_example(r, fmt, system_prompt))
        except DataError as e:
            msg = str(e)
            problems.append((r.origin, msg.removeprefix(f"{r.origin}: ")))
    _fail_listing(problems, f"cannot be read as {fmt}")
    return examples


def check_examples(examples: list, scorers: list[Scorer]) -> None:
    problems = []
    for ex in examples:
        for s in scorers:
            if (why := s.check(ex)) is not None:
                problems.append((ex.origin, f"scorer {s.name!r}: {why}"))
                break
    _fail_listing(problems, "lack what the scorer needs")


def score_cached(scorer: Scorer, examples: list, rows: list[dict], ctx: ScoringContext,
                 cache: ScoreCache | None) -> tuple[ScoreOutput, dict[str, Any]]:
    """Scores of `examples` (from the cache when data, config and model match); with timing facts."""
    key = cache_key(data_hash(rows), scorer.name, scorer.config.model_dump(mode="json"), scorer.identity(ctx))
    if cache is not None and (hit := cache.load(scorer.name, key)) is not None:
        log.info("%s: scores from the cache (%s)", scorer.name, cache.path(scorer.name, key))
        return hit, {"cached": True}
    t0 = time.perf_counter()
    out = scorer.score(examples, ctx)
    dt = time.perf_counter() - t0
    if len(out.values) != len(examples):
        raise RuntimeError(f"scorer {scorer.name!r} returned {len(out.values)} values for {len(examples)} examples")
    if cache is not None:
        cache.save(scorer.name, key, out)
    return out, {"cached": False, "seconds": dt, "examples_per_s": len(examples) / max(dt, 1e-9)}


def select_records(records: list[Record], cfg: SelectConfig, ctx: ScoringContext, *, fmt: str = "auto",
                   system_prompt: str | None = None, cache_dir: str | Path | None = None) -> SelectionResult:
    """Choose a subset of `records` as `cfg` says. Raises SelectionError with the reason when it cannot, and
    RecipeError (naming `select`) when the config's scorer/selector options do not fit their classes."""
    try:
        validate_select_config(cfg)
    except ValueError as e:
        raise RecipeError(f"recipe field 'select': {e}") from None
    examples = to_examples(records, fmt, system_prompt)
    scorer = build_scorer(cfg.scorer.name, cfg.scorer.options()) if cfg.scorer else None
    embedder = build_scorer(cfg.embedding.name, cfg.embedding.options()) if cfg.embedding else None
    selector = build_selector(cfg.selector.name, cfg.selector.options())
    check_examples(examples, [s for s in (scorer, embedder) if s is not None])

    dd = deduplicate(examples, cfg.dedup)
    pool_idx = np.asarray(dd.keep, dtype=np.int64)  # positions among the records read
    pool_examples = [examples[i] for i in pool_idx]
    rows = [records[i].data for i in pool_idx]
    cache = ScoreCache(cache_dir) if cache_dir is not None else None
    report: dict[str, Any] = {"read": len(records), "exact_duplicates": dd.exact, "near_duplicates": dd.near,
                              "scored": len(pool_idx), "scorer": cfg.scorer.model_dump() if cfg.scorer else None,
                              "embedding": cfg.embedding.model_dump() if cfg.embedding else None,
                              "selector": cfg.selector.model_dump(), "budget": cfg.budget}
    columns: dict[str, np.ndarray] = {}
    valid = np.ones(len(pool_idx), bool)
    oriented = raw = emb = None
    if scorer is not None:
        out, timing = score_cached(scorer, pool_examples, rows, ctx, cache)
        report["scoring"] = {scorer.name: timing}
        raw = np.asarray(out.values, dtype=np.float64)
        descending = scorer.higher_is_better if cfg.descending is None else cfg.descending
        oriented = raw if descending else -raw
        valid &= out.valid_mask() & np.isfinite(raw)
        columns = {scorer.name: raw, **{k: np.asarray(v, dtype=np.float64) for k, v in out.columns.items()}}
        report["dropped_by_scorer"] = int((~out.valid_mask()).sum())
    if embedder is not None:
        eout, timing = score_cached(embedder, pool_examples, rows, ctx, cache)
        report.setdefault("scoring", {})[f"embedding:{embedder.name}"] = timing
        emb = np.asarray(eout.values, dtype=np.float32)
    cand = np.flatnonzero(valid)  # positions in the scored pool
    why = (f" left ({len(records)} read, {dd.exact + dd.near} duplicates removed, "
           f"{len(pool_idx) - len(cand)} dropped by the scorer)")
    budget = resolve_budget(cfg.budget, len(records), len(cand), why)
    pool = Pool([pool_examples[i] for i in cand], None if oriented is None else oriented[cand],
                None if raw is None else raw[cand], None if emb is None else emb[cand], seed=cfg.seed)
    picked = cand[np.asarray(selector.select(pool, budget), dtype=np.int64)]  # positions in the scored pool
    if len(picked) == 0:
        raise SelectionError(f"selector {selector.name!r} selected nothing (pool of {len(cand)} candidates)")
    report.update({"candidates": int(len(cand)), "budget_examples": budget, "selected": int(len(picked)),
                   "selector_report": pool.report})
    report.update(build_report(columns=columns, chosen=picked, pool_examples=pool_examples,
                               chosen_examples=[pool_examples[i] for i in picked], embeddings=emb,
                               chosen_emb=None if emb is None else emb[picked]))
    picked = np.sort(picked)  # file order
    selected = []
    for p in picked:
        rec = records[pool_idx[p]]
        scores = {name: _json_number(v[p]) for name, v in columns.items()}
        selected.append(Record({**rec.data, SCORE_FIELD: scores} if scores else dict(rec.data), rec.origin))
    return SelectionResult([int(pool_idx[p]) for p in picked], selected, report)


def _json_number(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


# -- files ----------------------------------------------------------------------------------------


def write_records(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write records atomically (temp file + rename) as .jsonl, .json, .parquet or .csv (by the suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        raise SelectionError(f"{path}: output must end in .jsonl, .json, .parquet or .csv")
    with atomic_file(path, suffix=suffix) as tmp:
        if suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif suffix == ".json":
            Path(tmp).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        else:
            import datasets

            flat = [{k: json.dumps(v) if suffix == ".csv" and isinstance(v, (dict, list)) else v
                     for k, v in r.items()} for r in rows]
            ds = datasets.Dataset.from_list(flat)
            ds.to_parquet(str(tmp)) if suffix == ".parquet" else ds.to_csv(str(tmp), index=False)
    return path


def write_outputs(result: SelectionResult, out_dir: Path, subset_path: Path | None = None) -> dict[str, str]:
    """indices.json, report.json, report.png in `out_dir`; the subset file where asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if subset_path is not None:
        paths["subset"] = str(write_records(subset_path, [r.data for r in result.records]))
    atomic_write_json(out_dir / "indices.json", result.indices)
    atomic_write_json(out_dir / "report.json", result.report)
    paths["report"] = str(out_dir / "report.json")
    try:
        if (png := plot_histograms(result.report, out_dir / "report.png")) is not None:
            paths["plot"] = str(png)
    except Exception as e:  # a plot is a nicety; the selection stands without it
        log.warning("selection report plot failed: %s", e)
    return paths


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"read {report['read']} records; {report['exact_duplicates']} exact and {report['near_duplicates']} "
             f"near duplicates removed; {report.get('dropped_by_scorer', 0)} dropped by the scorer; "
             f"{report['candidates']} candidates; selected {report['selected']}"]
    for name, t in (report.get("scoring") or {}).items():
        lines.append(f"{name}: " + ("from the cache" if t.get("cached") else
                                    f"{t['seconds']:.1f} s ({t['examples_per_s']:.1f} examples/s)"))
    for name, s in report.get("scores", {}).items():
        if s["pool"].get("n") and s["subset"].get("n"):
            lines.append(f"{name}: mean {s['pool']['mean']:.4g} (pool) -> {s['subset']['mean']:.4g} (subset)")
    for key, v in report.get("diversity", {}).get("subset", {}).items():
        pool_v = report["diversity"]["pool"].get(key)
        lines.append(f"{key}: " + (f"{pool_v:.4f} (pool) -> " if pool_v is not None else "") + f"{v:.4f} (subset)")
    return lines


def select_file(data: str, cfg: SelectConfig, output: str | Path, *, ctx: ScoringContext, fmt: str = "auto",
                n: int | None = None, report_dir: str | Path | None = None) -> tuple[SelectionResult, dict]:
    """`tunelab select`: read a data file, select, write the subset (input's format + scores) and a report."""
    output = Path(output)
    report_dir = Path(report_dir) if report_dir is not None else output.with_name(output.stem + ".select")
    cache_dir = cfg.cache_dir or report_dir / "cache"
    result = select_records(load_records(data, n=n), cfg, ctx, fmt=fmt, cache_dir=cache_dir)
    return result, write_outputs(result, report_dir, output)


def select_for_recipe(recipe, run_dir: Path, accelerator):
    """A recipe's `data.select`: the main process selects into <run>/select/ (subset.jsonl, indices.json,
    report); every process then trains on the subset file, read through the ordinary data pipeline.

    On resume the saved subset is reused, so the training data cannot change under a resumed run.
    Returns the DatasetSpec of the subset.
    """
    from tunelab.assemble import SELECTED_SUBSET
    from tunelab.data.pipeline import load_spec_records
    from tunelab.recipe import DatasetSpec

    cfg: SelectConfig = recipe.data.select
    spec = recipe.data.train
    subset = Path(run_dir) / SELECTED_SUBSET  # assemble.training_spec reads it back for `tunelab eval/export RUN`
    sel_dir = subset.parent
    if accelerator.is_main_process and not subset.is_file():
        ctx = ScoringContext(model=recipe.model, device=accelerator.device)
        result = select_records(load_spec_records(spec), cfg, ctx, fmt=spec.format,
                                system_prompt=recipe.data.system_prompt, cache_dir=cfg.cache_dir or sel_dir / "cache")
        write_outputs(result, sel_dir, subset)
        for line in summary_lines(result.report):
            accelerator.print(f"select: {line}")
        del ctx
        gc.collect()
    accelerator.wait_for_everyone()
    return DatasetSpec(path=str(subset), format=spec.format)
