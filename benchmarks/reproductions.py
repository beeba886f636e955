"""Reproductions: published claims of the fine-tuning literature, each tested at small scale on the built-in model.

Each claim (benchmarks/_repro_claims.py) is a function of one seed that trains, merges and evaluates through
tunelab's own code (benchmarks/_repro_lab.py: `run_recipe`, `run_merge`, `calibrate_bitdelta`, `run_suite`)
and returns its measurements. Results are cached per (claim, seed) as JSON under <workdir>/<full|quick>/results
(atomic writes), so a rerun computes only the missing seeds (`--force` recomputes them); runs, merges' scores
and the base model's scores are cached too and shared between claims.

Verdict over the seeds: each claim states checks (key, side, threshold); a seed passes when all hold.
"reproduced" when every seed passes, "not reproduced" when none does, "inconclusive" when the seeds' spread
straddles a threshold (some pass, some not) or a measurement is undefined (NaN: e.g. a fine-tune that gained
nothing leaves no gain to keep). Fewer seeds than asked: the verdict is shown with the count of seeds.

Run:  python benchmarks/reproductions.py --quick --seeds 1          (tiny random model: checks the harness)
      python benchmarks/reproductions.py --only bitdelta dare       (claims, 3 seeds each, cached per seed)
      python benchmarks/reproductions.py --docs-only                (rewrite docs/reproductions.md from the cache)
docs/reproductions.md is written from the cached results after every full-budget invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from _repro_claims import CLAIMS, Claim
from _repro_lab import HERE, Lab

from tunelab.core.io import atomic_write_json, atomic_write_text

DOCS = HERE.parent / "docs" / "reproductions.md"
SEEDS = 3


def passes(value: float, side: str, threshold: float) -> bool:
    return {">=": value >= threshold, "<=": value <= threshold, ">": value > threshold, "<": value < threshold}[side]


def verdict(results: list[dict], checks: tuple[tuple[str, str, float], ...]) -> str:
    """reproduced / not reproduced / inconclusive over the seeds' results (see the module docstring)."""
    if not results:
        return "not run yet"
    values = [[r[key] for key, _, _ in checks] for r in results]
    if any(isinstance(v, float) and math.isnan(v) for row in values for v in row):
        return "inconclusive"
    ok = [all(passes(v, side, t) for v, (_, side, t) in zip(row, checks)) for row in values]
    return "reproduced" if all(ok) else "not reproduced" if not any(ok) else "inconclusive"


def cache_path(lab: Lab, name: str, seed: int) -> Path:
    return lab.root / "results" / f"{name}-seed{seed}.json"


def cached(lab: Lab, name: str, seeds: int) -> list[dict]:
    return [json.loads(p.read_text()) for s in range(seeds) if (p := cache_path(lab, name, s)).is_file()]


def run_claim(lab: Lab, claim: Claim, seeds: int, force: bool = False, log=print) -> list[dict]:
    """Every seed of a claim: cached ones read back (unless `force`), missing ones computed and written."""
    results = []
    for seed in range(seeds):
        path = cache_path(lab, claim.name, seed)
        if path.is_file() and not force:
            results.append(json.loads(path.read_text()))
            log(f"[{claim.name}] seed {seed}: cached")
            continue
        t0 = time.perf_counter()
        m = claim.fn(lab, seed)
        m.update(seed=seed, seconds=time.perf_counter() - t0, conditions=lab.conditions())
        atomic_write_json(path, m)
        log(f"[{claim.name}] seed {seed}: {json.dumps({k: m[k] for k, _, _ in claim.checks})} "
            f"({m['seconds']:.0f} s)")
        results.append(m)
    return results


def fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{fmt(values[0])} (one seed)"
    undefined = sum(math.isnan(v) for v in values)
    if undefined:  # statistics.stdev fails on NaN; say how many seeds are undefined instead
        return f"undefined in {undefined} of {len(values)} seeds"
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return f"{fmt(mean)} ± {fmt(sd)} [{fmt(min(values))}, {fmt(max(values))}]"


def table(lab: Lab, seeds: int, command: str) -> str:
    rows = ["| claim | paper | setting | metric and threshold | per seed (seeds 0, 1, ...) | mean ± sd [min, max] "
            "| verdict |",
            "|---|---|---|---|---|---|---|"]
    for c in CLAIMS.values():
        res = cached(lab, c.name, seeds)
        keys = [f"`{k}`" for k, _, _ in c.checks] + list(c.context)  # the checked ones in code style
        per_seed = "<br>".join(f"{k}: {', '.join(fmt(r[k.strip('`')]) for r in res) or '-'}" for k in keys)
        mean = "<br>".join(spread([r[k] for r in res]) for k, _, _ in c.checks)
        metric = f"{c.metric}; claim: " + " and ".join(f"`{k}` {side} {t:g}" for k, side, t in c.checks)
        v = verdict(res, c.checks)
        if v == "not run yet":
            v = f"not run yet: `{command} --only {c.name}`"
        elif len(res) < seeds:
            v = f"{v} ({len(res)} of {seeds} seeds; `{command} --only {c.name}` adds the rest)"
        rows.append(f"| `{c.name}`: {c.text} | {c.paper} | {c.setting} | {metric} | {per_seed} | {mean} | {v} |")
    return "\n".join(rows)


def write_docs(lab: Lab, seeds: int, path: Path) -> None:
    intro = (HERE / "reproductions_intro.md").read_text()
    command = "python benchmarks/reproductions.py"
    b = lab.conditions()
    text = (f"{intro.rstrip()}\n\n## The table\n\nWritten by `{command}` from its cached results "
            f"({lab.root.name} budget: {b['steps']} steps x {b['batch_size']} examples, {b['precision']}, "
            f"{b['n_eval']} held-out items, perplexity on the first {b['ppl_chars']:,} characters of WikiText-2 "
            f"raw test, refusal on {b['safety_n']} harmful prompts; {seeds} seeds: 0..{seeds - 1}).\n\n"
            f"{table(lab, seeds, command)}\n")
    atomic_write_text(path, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(CLAIMS), help="Claims to run (default: all, in table order).")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="Seeds per claim (0..N-1).")
    ap.add_argument("--quick", action="store_true", help="The tiny random test model and tiny budgets: checks "
                    "that every claim runs (its figures mean nothing; the table goes to the workdir, not docs/).")
    ap.add_argument("--force", action="store_true", help="Recompute the cached seeds of the chosen claims.")
    ap.add_argument("--workdir", default="runs/reproductions", help="Runs, scores and per-seed results.")
    ap.add_argument("--docs-only", action="store_true", help="Only rewrite the table from the cached results.")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lab = Lab(args.workdir, quick=args.quick)
    docs = lab.root / "reproductions.md" if args.quick else DOCS
    if not args.docs_only:
        for name in args.only or list(CLAIMS):
            results = run_claim(lab, CLAIMS[name], args.seeds, force=args.force)
            print(f"[{name}] verdict: {verdict(results, CLAIMS[name].checks)}", flush=True)
            write_docs(lab, args.seeds, docs)  # after every claim: an interrupted run keeps what it finished
    write_docs(lab, args.seeds, docs)
    print(f"wrote {docs}")


if __name__ == "__main__":
    main()
