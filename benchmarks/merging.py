"""Benchmark: merging LoRA fine-tunes of SmolLM2-135M-Instruct trained on different built-in tasks.

What it measures: whether one merged model keeps the skills of several single-task fine-tunes.
  1. One LoRA fine-tune per task (date_format, arithmetic, sort_numbers by default), each a tunelab run
     (`tunelab.runner.run_recipe` with a small Recipe: r=16, alpha=32, lr 1e-3, bf16 autocast).
  2. The fine-tunes (given as their run directories) are merged by every method through
     `tunelab.merging.run_merge` (the code behind `tunelab merge`): uniform soup (linear), task
     arithmetic, TIES, DARE (linear and TIES), Model Stock, LiNeS, greedy soup (scored on held-out
     exact match of all tasks, on other items than the reported ones: score_seed=1), and the LoRA-level
     merges (lora_linear, lora_cat, lora_svd; the merged adapter is folded into the base to evaluate).
  3. Every model is scored by held-out exact match (greedy decoding, the task's checker) on every task
     (eval split, seed 0, the same items for every row). Reference rows: the base model and each
     fine-tune alone. Compression rows (bitdelta, svd_delta rank 8 of each fine-tune) show how much of
     a single fine-tune's own-task score survives compression, with the size ratio of the stored delta.

Runs are kept in --workdir and reused when they already have the requested number of steps (pass
--retrain to redo them); merged checkpoints are deleted after scoring unless --keep.

Run:  python benchmarks/merging.py --quick          (2 steps per task, 4 held-out items: checks it works)
      python benchmarks/merging.py                  (60 steps per task, 100 held-out items; ~17 min on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

try:
    import tunelab  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

MERGES = {  # name -> (merge_method, parameters); models are the fine-tunes' run dirs
    "linear (uniform soup)": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}),
    "ties": ("ties", {"density": 0.5, "lambda": 1.0}),
    "dare_linear": ("dare_linear", {"density": 0.5, "lambda": 1.0, "seed": 0}),
    "dare_ties": ("dare_ties", {"density": 0.5, "lambda": 1.0, "seed": 0}),
    "model_stock": ("model_stock", {}),
    "lines": ("lines", {"lambda": 1.0}),  # alpha = 1 / number of tasks, set below
    "greedy_soup": ("greedy_soup", {}),  # score parameters set below
    "lora_linear": ("lora_linear", {}),
    "lora_cat": ("lora_cat", {}),
    "lora_svd": ("lora_svd", {"rank": 16}),
}
COMPRESS = {"bitdelta": ("bitdelta", {}), "svd_delta r8": ("svd_delta", {"rank": 8})}


def train_runs(args, workdir: Path) -> dict[str, Path]:
    """One LoRA run per task; reused when <run>/summary.json already has the requested steps."""
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    runs = {}
    for task in args.tasks:
        name = f"ft-{task}"
        run = workdir / "runs" / name
        summary = run / "summary.json"
        if not args.retrain and summary.is_file() and json.loads(summary.read_text()).get("steps") == args.steps \
                and (run / "export" / "adapter" / "adapter_config.json").is_file():
            print(f"[train] {task}: reusing {run}")
            runs[task] = run
            continue
        recipe = Recipe.model_validate({
            "name": name, "output_dir": str(workdir / "runs"),
            "data": {"train": {"builtin": task, "n": args.steps * args.batch_size, "seed": 0}, "eval": None,
                     "max_length": 128},
            "method": {"name": "lora", "r": 16, "alpha": 32},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "warmup_ratio": 0.1,
                      "precision": "bf16", "seed": 0},
            "eval": {"before": False, "after": False},
        })
        t0 = time.perf_counter()
        run_recipe(recipe, overwrite=True)
        print(f"[train] {task}: {args.steps} steps in {time.perf_counter() - t0:.0f} s -> {run}")
        runs[task] = run
    return runs


class Scorer:
    """Held-out exact match of a model directory (HF checkpoint or PEFT adapter) on each task."""

    def __init__(self, args, base_dir: str):
        from tunelab.data.pipeline import eval_items
        from tunelab.model import load_tokenizer
        from tunelab.recipe import DataConfig, DatasetSpec, ModelConfig

        self.args, self.base_dir = args, base_dir
        self.tok = load_tokenizer(ModelConfig(name_or_path=base_dir))
        self.items = {t: eval_items(DatasetSpec(builtin=t, split="eval", n=args.n_eval, seed=0), DataConfig())
                      for t in args.tasks}

    def load(self, path: Path):
        from tunelab.model import load_model
        from tunelab.recipe import ModelConfig

        if (Path(path) / "adapter_config.json").is_file():
            from peft import PeftModel

            return PeftModel.from_pretrained(
                load_model(ModelConfig(name_or_path=self.base_dir)), str(path)).merge_and_unload()
        return load_model(ModelConfig(name_or_path=str(path)))

    def __call__(self, path: Path, tasks=None) -> dict[str, float]:
        import torch

        from tunelab.evaluate.tasks import exact_match

        model = self.load(path)
        if torch.cuda.is_available():
            model = model.cuda()
        out = {}
        for t in tasks or self.args.tasks:
            out[t] = exact_match(model, self.tok, self.items[t], max_new_tokens=self.args.max_new_tokens,
                                 batch_size=50, precision="bf16", progress=False)["exact_match"]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Tiny numbers of steps and items (checks it works).")
    ap.add_argument("--tasks", default="date_format,arithmetic,sort_numbers")
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps per task (default 60, quick 2).")
    ap.add_argument("--batch-size", type=int, default=None, help="Default 16, quick 4.")
    ap.add_argument("--n-eval", type=int, default=None, help="Held-out items per task (default 100, quick 4).")
    ap.add_argument("--score-n", type=int, default=None,
                    help="Greedy soup scoring items per task (default 30, quick 2).")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--methods", default=None, help="Comma-separated subset of: " + ", ".join([*MERGES, *COMPRESS]))
    ap.add_argument("--workdir", default="runs/merging-benchmark", help="Runs, merges and results.json go here.")
    ap.add_argument("--retrain", action="store_true", help="Train the fine-tunes again even if runs exist.")
    ap.add_argument("--keep", action="store_true", help="Keep the merged checkpoints.")
    args = ap.parse_args()
    q = args.quick
    args.tasks = args.tasks.split(",")
    args.steps = args.steps or (2 if q else 60)
    args.batch_size = args.batch_size or (4 if q else 16)
    args.n_eval = args.n_eval or (4 if q else 100)
    args.score_n = args.score_n or (2 if q else 30)
    wanted = set(args.methods.split(",")) if args.methods else None
    workdir = Path(args.workdir) / ("quick" if q else "full")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from tunelab.merging import run_merge
    from tunelab.model import resolve_model_path
    from tunelab.recipe import ModelConfig

    t_start = time.perf_counter()
    base_dir = resolve_model_path(ModelConfig())[0]
    runs = train_runs(args, workdir)
    scorer = Scorer(args, base_dir)
    rows: list[dict] = []

    def add_row(label: str, path: Path, tasks=None, **extra) -> None:
        t0 = time.perf_counter()
        scores = scorer(path, tasks)
        rows.append({"model": label, **scores, **extra, "eval_s": time.perf_counter() - t0})
        shown = "  ".join(f"{t} {100 * v:.1f}%" for t, v in scores.items())
        print(f"[eval] {label:<28} {shown}")

    add_row("base (no fine-tune)", Path(base_dir))
    for task, run in runs.items():
        add_row(f"fine-tune {task}", run / "export" / "merged")

    merges_dir = workdir / "merges"
    n = len(args.tasks)
    for label, (method, params) in MERGES.items():
        if wanted and label not in wanted and method not in wanted:
            continue
        params = dict(params)
        if method == "lines":
            params["alpha"] = 1.0 / n  # shallowest layers averaged (1/T), deepest at full task arithmetic
        if method == "greedy_soup":
            params.update(score_task=args.tasks, score_n=args.score_n, score_seed=1, score_metric="exact_match")
        # the figures in docs/merging.md were measured with peft's TIES/DARE conventions (DARE rescaled by
        # 1 / density, disjoint mean); recipes default to mergekit's since mergekit configs are accepted
        recipe = {"merge_method": method, "base_model": base_dir, "convention": "peft",
                  "models": [{"model": str(run)} for run in runs.values()], "parameters": params}
        out = merges_dir / method
        report: dict = {}
        t0 = time.perf_counter()
        run_merge(recipe, out, overwrite=True, report=report)
        merge_s = time.perf_counter() - t0
        extra = {"merge_s": merge_s}
        if "greedy_soup" in report:
            extra["note"] = "soup of " + ", ".join(args.tasks[i] for i in report["greedy_soup"]["selected"])
        if report.get("output") == "adapter":
            extra["note"] = f"adapter rank {report['rank']}"
        add_row(label, out, **extra)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    for label, (method, params) in COMPRESS.items():
        if wanted and label not in wanted and method not in wanted:
            continue
        for task, run in runs.items():
            recipe = {"merge_method": method, "base_model": base_dir, "models": [{"model": str(run)}],
                      "parameters": params}
            out = merges_dir / f"{method}-{task}"
            report = {}
            t0 = time.perf_counter()
            run_merge(recipe, out, overwrite=True, report=report)
            c = report["compression"]
            add_row(f"{label} of {task}", out, tasks=[task], merge_s=time.perf_counter() - t0,
                    note=f"delta ratio {c['ratio']:.4f} (matrices {c['compressed_ratio']:.4f})")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    print()
    print(f"Held-out exact match, {args.n_eval} items per task (eval split, seed 0); fine-tunes: LoRA r=16, "
          f"{args.steps} steps x batch {args.batch_size} per task{' (QUICK MODE: numbers mean nothing)' if q else ''}")
    head = ["model", *args.tasks, "mean", "merge s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r.get(t) for t in args.tasks]
        got = [v for v in vals if v is not None]
        cells = [r["model"], *(f"{100 * v:.1f}" if v is not None else "-" for v in vals),
                 f"{100 * sum(got) / len(got):.1f}" if len(got) == len(vals) else "-",
                 f"{r['merge_s']:.1f}" if "merge_s" in r else "-", r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    results = {"args": {k: v for k, v in vars(args).items()}, "rows": rows,
               "total_s": time.perf_counter() - t_start}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\ntotal {results['total_s']:.0f} s; results in {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
