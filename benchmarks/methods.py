"""Benchmark: every registered method, same task, same model, same token budget, one table.

Each method trains in a fresh subprocess through the real runner path, i.e. exactly what `tunelab run` does
minus the export: the quickstart recipe (`recipes/quickstart.yaml`: SmolLM2-135M-Instruct, the built-in
`date_format` task, SFT on the answer tokens, bf16 autocast, warmup + cosine) with `method: {name: METHOD}`
(the method's default options) and the overrides below, then `runner.open_workspace` -> `prepare_workspace`
(calibration for CorDA/EVA/LoRA-GA, method.prepare, engine) -> `train_workspace` -> `evaluate`.
Every method sees the same examples in the same order (same steps x batch size, same seed), so the same tokens.

Columns:
  trainable %   trainable / total parameters of the prepared model (shared tensors counted once)
  exact match   greedy generations on the first `eval n` held-out items, checked by the task's checker
  eval loss     cross-entropy per answer token on the same held-out items
  tokens/s      training tokens / CPU time of the training steps 2..N (the first step's warm-up and the
                checkpoint written after the last step are excluded); `step s` is the median step's CPU time.
                CPU time (one thread) is what a step takes on an unshared core, and unlike wall time it does not
                change when other jobs share the core; the wall-clock figures are in the JSON too
  peak MB       the child's peak resident set (ru_maxrss) at the end of training: model, data, method,
                optimizer state, activations (and calibration, for the methods that calibrate)
  base MB       resident set right after the model and data are loaded; `extra` = peak - base
A row `(untrained)` evaluates the starting point (LoRA prepared, B = 0: the base model) for reference.
A method that fails, or runs past `--cpu-limit` CPU seconds, is reported in its row with the error; the table
still completes. Each child deletes its run's checkpoint after reading the metrics (up to 1.6 GB for full FT).

  default   16 steps x 8 examples (~9.6k training tokens), exact match and loss on 32 held-out items
            (measured: 34 CPU-minutes on one core, 6 of them EVA's calibration; docs/methods.md)
  --quick   4 steps x 8 examples, 12 held-out items (measured: 18 CPU-minutes on one core)
`cpu s` is each child's whole CPU time (imports, load, calibration, training, evaluation); on a core shared with
other jobs the wall time is longer by the share lost, while the CPU-time columns stay comparable.
Best of a learning-rate grid: `--lr-grid 0.3,1,3` trains each method at its rate x each factor and keeps, per
method, the point with the lowest held-out loss (3x the CPU; every point is in the JSON under "lr_grid").
Run:  python benchmarks/methods.py [--quick] [--only lora,mezo] [--steps N] [--json out.json] [--markdown]
                                   [--lr-grid 0.3,1,3] [--set train.compile=false ...]
      python benchmarks/methods.py --table a.json b.json   (one table from split invocations' --json files)
      (children use every core unless OMP_NUM_THREADS is set; the one-core table of docs/methods.md was
      OMP_NUM_THREADS=1 taskset -c 1 ...)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

from _common import HERE, peak_rss_mb, rss_mb, run_child

from tunelab.core.io import atomic_write_json

RECIPE = os.path.join(HERE, "..", "src", "tunelab", "recipes", "quickstart.yaml")

# Learning rate per method (everything else is the method's defaults and the shared budget). A short run
# needs each family's usual rate: adapters ~1e-3 (the quickstart's LoRA rate); initialisations that start
# from the principal components of W (PiSSA, OLoRA, CorDA) or a scaled gradient (LoRA-GA), and LoRA+ (whose
# B runs 16x faster), lower; methods that update the model's own weights (full, freeze, selective, sparse,
# GaLore) ~1e-5..1e-4, higher the fewer entries train; MeZO (zeroth-order, eps 1e-3) its paper's 1e-6 range;
# tiny vectors (IA3, VeRA, soft prompts, prefixes) higher.
DEFAULT_LR = 1e-3
LR = {
    "full": 2e-5, "freeze": 1e-4, "surgical": 1e-4, "hft": 3e-5, "lisa": 5e-5, "galore": 1e-4,
    "lift": 1e-4, "spiel": 5e-4, "gmt": 5e-5, "smt": 1e-4, "diablo": 5e-4,
    "mezo": 1e-6,
    "pissa": 2e-4, "olora": 2e-4, "corda": 2e-4, "lora_ga": 2e-4, "loraplus": 2e-4,
    "vera": 1e-2, "ia3": 1e-2, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "p_tuning": 3e-3,
}
BUDGETS = {  # steps, batch size, held-out items
    "default": {"steps": 16, "batch_size": 8, "eval_n": 32},
    "quick": {"steps": 4, "batch_size": 8, "eval_n": 12},
}
UNTRAINED = "(untrained)"


def recipe_for(method: str, steps: int, batch_size: int, eval_n: int, out_dir: str, lr: float | None = None,
               overrides: tuple[str, ...] = ()):
    """The quickstart recipe with `method: {name: method}` and the benchmark's budget, validated as `tunelab run`
    validates a recipe file. `lr`: instead of the method's rate from LR (a grid point; named in the run's name);
    `overrides`: recipe overrides (`--set`) applied after the benchmark's own."""
    import yaml

    from tunelab.validate import load_validated_recipe

    data = yaml.safe_load(open(RECIPE))
    data["method"] = {"name": method}
    name = f"bench-{method}" if lr is None else f"bench-{method}-lr{lr:g}"
    path = os.path.join(out_dir, f"recipe-{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    lr = LR.get(method, DEFAULT_LR) if lr is None else lr
    return load_validated_recipe(path, [f"name={name}", f"output_dir={out_dir}", f"train.max_steps={steps}",
                              f"train.batch_size={batch_size}", f"train.lr={lr}",
                              "train.save_every=null", "train.keep_checkpoints=1", f"eval.n={eval_n}",
                              f"data.train.n={steps * batch_size}", f"data.eval.n={eval_n}",
                              f"eval.batch_size={min(eval_n, 50)}", "eval.before=false", *overrides])


def child(name: str, steps: int, batch_size: int, eval_n: int, out_dir: str, lr: float | None = None,
          overrides: tuple[str, ...] = ()) -> dict:
    import logging

    import torch

    from tunelab.runner import evaluate, open_workspace, prepare_workspace, train_workspace

    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    method = "lora" if name == UNTRAINED else name
    recipe = recipe_for(method, steps, batch_size, eval_n, out_dir, lr, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    ws = open_workspace(recipe)
    base = rss_mb()
    c1 = time.process_time()
    model = prepare_workspace(ws)
    c2 = time.process_time()
    row = {"name": name, "lr": recipe.train.lr, **ws.params, "base_mb": base}
    if name != UNTRAINED:
        cpu_at_step: dict[int, float] = {}  # CPU seconds of this process when step k ended (before any checkpoint)
        model, result, _ = train_workspace(ws, on_step=lambda k, loss: cpu_at_step.__setitem__(k, time.process_time()))
        row["peak_mb"] = peak_rss_mb()
        shutil.rmtree(ws.run_dir / "checkpoints", ignore_errors=True)  # up to ~1.6 GB each (full + AdamW state)
        steps_log = [json.loads(line) for line in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = steps_log[1:] or steps_log  # steps 2..N: the first step's warm-up excluded
        cpu = [cpu_at_step[k] - cpu_at_step[k - 1] for k in range(2, result.steps + 1)] or [float("nan")]
        row.update({"steps": result.steps, "tokens": result.tokens, "final_train_loss": result.final_loss,
                    "train_time_s": result.wall_time_s,
                    "tokens_per_s": sum(r["tokens"] for r in timed) / sum(cpu),
                    "step_s": statistics.median(cpu),
                    "wall_tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
                    "wall_step_s": statistics.median(r["step_time_s"] for r in timed)})
    else:
        row["peak_mb"] = peak_rss_mb()
    c3 = time.process_time()
    after = evaluate(ws, model, "after")
    row.update({"exact_match": after.get("exact_match"), "eval_loss": after.get("eval_loss"),
                "eval_time_s": after.get("eval_time_s"), "wall_s": time.perf_counter() - t0,
                "cpu_s": {"load": c1 - c0, "prepare": c2 - c1, "train": c3 - c2, "eval": time.process_time() - c3}})
    return row


def best_of_grid(rows: list[dict]) -> dict:
    """The row of a learning-rate grid with the lowest held-out loss (ties: the higher exact match), with every
    point's lr, loss and exact match (or error) under "lr_grid"; a grid whose every point failed gives its first
    failure. The loss is measured on the same held-out items the table reports, so the choice is optimistic in
    the same way for every method."""
    ok = [r for r in rows if "error" not in r and r.get("eval_loss") is not None]
    best = min(ok, key=lambda r: (r["eval_loss"], -(r.get("exact_match") or 0))) if ok else rows[0]
    grid = [{"lr": r.get("lr"), "eval_loss": r.get("eval_loss"), "exact_match": r.get("exact_match"),
             **({"error": r["error"]} if "error" in r else {})} for r in rows]
    return {**best, "lr_grid": grid}


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def fmt_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["name"], "FAILED: " + r["error"]]

    def num(key, f):
        return f(r[key]) if r.get(key) is not None else "-"

    return [r["name"], f"{r['lr']:.0e}", num("trainable_pct", lambda v: f"{v:.3g}%"),
            num("exact_match", lambda v: f"{100 * v:.0f}%"), num("eval_loss", lambda v: f"{v:.3f}"),
            num("tokens_per_s", lambda v: f"{v:.0f}"), num("step_s", lambda v: f"{v:.2f}"),
            num("peak_mb", lambda v: f"{v:.0f}"), num("base_mb", lambda v: f"+{r['peak_mb'] - v:.0f}"),
            num("child_cpu_s", lambda v: f"{v:.0f}")]


HEADER = ["method", "lr", "trainable", "exact match", "eval loss", "tokens/s", "step s", "peak MB", "extra MB",
          "cpu s"]


def text_table(rows: list[dict]) -> str:
    cells = [HEADER] + [fmt_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells if len(c) == len(HEADER)) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     if len(row) == len(HEADER) else f"{row[0]:<{widths[0]}}  {row[1]}" for row in cells)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = fmt_row(r)
        if "error" in r:
            cells = cells + [""] * (len(HEADER) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(rows: list[dict], markdown: bool) -> None:
    """The text table, each grid's points (with --lr-grid), and the Markdown table if asked."""
    print(text_table(rows))
    for r in rows:
        if "lr_grid" in r:
            print(f"lr grid {r['name']}: " + "  ".join(
                f"{g['lr']:.0e}: " + (f"loss {g['eval_loss']:.3f} em {100 * (g.get('exact_match') or 0):.0f}%"
                                      if "error" not in g else "failed")
                + (" (chosen)" if g["lr"] == r.get("lr") else "") for g in r["lr_grid"]))
    if markdown:
        print()
        print(markdown_table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller budget: 4 steps x 8 examples, 12 held-out items")
    ap.add_argument("--only", default=None, help="comma-separated method names (default: every registered method)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (overrides the budget)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per step (overrides the budget)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out items (overrides the budget)")
    ap.add_argument("--cpu-limit", type=int, default=900,
                    help="CPU seconds per method, all threads together (RLIMIT_CPU), before it is reported failed; "
                         "wall-clock limit 3x that")
    ap.add_argument("--json", default=None, help="also write the rows and the conditions to this JSON file "
                                                 "(after every row; `complete` says whether the run finished)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    ap.add_argument("--no-untrained", action="store_true", help="skip the untrained reference row")
    ap.add_argument("--lr-grid", default=None,
                    help="comma-separated factors of each method's rate (e.g. 0.3,1,3): each method trains at every "
                         "point and its row is the point with the lowest held-out loss (the grid is in the JSON)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every method (e.g. train.compile=false: the eager engine)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="print the table of the rows in these --json files (a run split over several invocations, "
                         "e.g. one per core with --only) and exit")
    ap.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        rows = [r for path in args.table for r in json.load(open(path))["rows"]]
        rows.sort(key=lambda r: (r["name"] != UNTRAINED, r["name"]))
        print_tables(rows, markdown=True)
        return
    budget = dict(BUDGETS["quick" if args.quick else "default"])
    for key in ("steps", "batch_size", "eval_n"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    if args.child:
        print(json.dumps(child(args.child, budget["steps"], budget["batch_size"], budget["eval_n"], args.out_dir,
                               args.lr, tuple(args.set))))
        return

    from tunelab.methods.registry import list_methods

    known = list(list_methods())
    names = known if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown method(s): {', '.join(unknown)}; known: {', '.join(known)}")
    if not args.no_untrained:
        names = [UNTRAINED] + names
    print(f"{len(names)} rows; budget {budget['steps']} steps x {budget['batch_size']} examples, "
          f"{budget['eval_n']} held-out items; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset (all cores)')}", flush=True)
    factors = [float(f) for f in args.lr_grid.split(",")] if args.lr_grid else None
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-methods-") as out_dir:
        def one(name: str, lr: float | None) -> dict:
            t0, cpu0 = time.perf_counter(), children_cpu_s()
            r = run_child(__file__, name, ["--steps", str(budget["steps"]), "--batch-size", str(budget["batch_size"]),
                                           "--eval-n", str(budget["eval_n"]), "--out-dir", out_dir,
                                           *(["--lr", repr(lr)] if lr is not None else []),
                                           *(["--set", *args.set] if args.set else [])],
                          timeout=3 * args.cpu_limit, cpu_limit=args.cpu_limit)
            r["child_cpu_s"] = children_cpu_s() - cpu0
            if lr is not None:
                r.setdefault("lr", lr)  # a failed child reports no lr
            status = f"FAILED: {r['error']}" if "error" in r else (
                f"exact match {100 * (r.get('exact_match') or 0):.0f}%  eval loss {r.get('eval_loss') or 0:.3f}")
            at = f" lr {lr:.0e}" if lr is not None else ""
            print(f"[{len(rows) + 1}/{len(names)}] {name:<16}{at} {time.perf_counter() - t0:6.0f} s wall "
                  f"{r['child_cpu_s']:6.0f} s CPU  {status}", flush=True)
            return r

        def save(complete: bool) -> None:
            """The rows so far (atomically, after every row: an interrupted run keeps what it measured)."""
            if args.json:
                total, cpu_total = time.perf_counter() - t_all, sum(r["child_cpu_s"] for r in rows)
                meta = {"budget": budget, "total_s": total, "cpu_total_s": cpu_total, "complete": complete,
                        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "affinity": sorted(os.sched_getaffinity(0)), "command": " ".join(sys.argv)}
                atomic_write_json(args.json, {"conditions": meta, "rows": rows})

        for name in names:
            if factors and name != UNTRAINED:
                grid = [one(name, LR.get(name, DEFAULT_LR) * f) for f in factors]
                rows.append({**best_of_grid(grid), "child_cpu_s": sum(r["child_cpu_s"] for r in grid)})
            else:
                rows.append(one(name, None))
            save(complete=False)
        save(complete=True)
    total = time.perf_counter() - t_all
    print()
    cpu_total = sum(r["child_cpu_s"] for r in rows)
    print_tables(rows, markdown=args.markdown)
    print(f"\ntotal {total / 60:.1f} min wall, {cpu_total / 60:.1f} min CPU; {sum('error' in r for r in rows)} failed")


if __name__ == "__main__":
    main()
