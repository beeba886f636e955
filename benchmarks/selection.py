"""Benchmark: data selection at 10% of a real instruction set, fine-tuning SmolLM2-135M-Instruct on each subset.

What it measures: whether a selector's 10% beats a random 10% (and how close it gets to all the data) with the
same number of training steps.
  1. Data: alpaca-cherry-5pct (3,111 Alpaca records chosen by IFD; default) or LIMA (1,029) from ../shared/data.
     A fixed seeded split: a held-out set (eval loss), a small target set (for LESS only), the rest is the pool.
  2. One row per selector, each a tunelab run through a recipe's `data.select:` (so the benchmark runs the same
     code as `tunelab run`): random, length (Long Is More), perplexity, ifd_ppl, ifd_loss, deita (judge
     complexity x quality + MiniLM embeddings), kcenter (MiniLM), qdit (IFD + MiniLM), cluster_rank (IFD +
     MiniLM), gradient (LESS, topk), and the whole pool as a reference row. Scores are cached in the workdir, so
     selectors sharing a scorer score once. `grape` needs several responses per instruction, which these sets
     do not have: no row.
  3. Every row trains LoRA (r=16, alpha=32, all linear) for the same number of steps, then reports the held-out
     loss (mean CE per response token) and an instruction-following score: ROUGE-L F1 (Self-Instruct's metric)
     of greedy answers to Self-Instruct's human-written seed tasks against their reference outputs.
  4. It prints examples/s of IFD scoring on the built-in model (from the selection report).

Run:  python benchmarks/selection.py --quick     (a 160-example pool, 8 steps: checks that it works, minutes)
      python benchmarks/selection.py             (the whole set, 10% budget, 150 steps of 8; hours on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

try:
    import tunelab  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATASETS = {"alpaca-cherry": SHARED / "alpaca-cherry-5pct" / "cherry_alpaca_5_percent.json",
            "lima": SHARED / "lima" / "lima.json"}
MINILM = {"name": "embedding", "encoder": "minilm"}


def rows(ifd: dict, target: str) -> dict[str, dict | None]:
    """Row name -> data.select config (None = the whole pool)."""
    judge = lambda aspect: {"name": "judge", "aspect": aspect}  # noqa: E731
    return {
        "random": {"scorer": None, "selector": {"name": "random"}},
        "length (topk)": {"scorer": {"name": "length"}},
        "perplexity (topk, low)": {"scorer": {"name": "perplexity"}},
        "ifd_ppl (topk)": {"scorer": {"name": "ifd_ppl", **ifd}},
        "ifd_loss (topk)": {"scorer": {"name": "ifd_loss", **ifd}},
        "deita": {"scorer": {"name": "composite", "parts": [judge("complexity"), judge("quality")]},
                  "embedding": MINILM, "selector": {"name": "deita", "threshold": 0.9}},
        "kcenter": {"scorer": None, "embedding": MINILM, "selector": {"name": "kcenter"}},
        "qdit": {"scorer": {"name": "ifd_ppl", **ifd}, "embedding": MINILM, "selector": {"name": "qdit", "alpha": 0.5}},
        "cluster_rank": {"scorer": {"name": "ifd_ppl", **ifd}, "embedding": MINILM,
                         "selector": {"name": "cluster_rank"}},
        "gradient / LESS (topk)": {"scorer": {"name": "gradient", "target": target}},
        "full pool": None,
    }


def split(path: Path, n_heldout: int, n_target: int, n_pool: int | None, workdir: Path) -> dict[str, Path]:
    """Seeded split into held-out / target / pool files (jsonl, the records unchanged)."""
    records = json.loads(path.read_text())
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    parts = {"heldout": order[:n_heldout], "target": order[n_heldout: n_heldout + n_target],
             "pool": order[n_heldout + n_target:][:n_pool]}
    out = {}
    workdir.mkdir(parents=True, exist_ok=True)
    for name, idx in parts.items():
        out[name] = workdir / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in idx))
    return out


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (longest common subsequence)."""
    a, b = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def if_prompts(n: int) -> list[tuple[list[dict], str]]:
    """Self-Instruct seed tasks: (chat prompt, reference output)."""
    items = []
    for line in (SHARED / "self-instruct-seed" / "seed_tasks.jsonl").read_text().splitlines():
        t = json.loads(line)
        inst = t["instances"][0]
        q = t["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
        items.append(([{"role": "user", "content": q}], inst["output"]))
    return items[:n]


def if_score(model_dir: str, prompts, max_new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    from tunelab.evaluate.tasks import generate_answers
    from tunelab.model import load_tokenizer
    from tunelab.recipe import ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    preds = generate_answers(model, tok, [p for p, _ in prompts], max_new_tokens=max_new_tokens, batch_size=8,
                             progress=False)
    return sum(rouge_l(p, ref) for p, (_, ref) in zip(preds, prompts)) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small pool and few steps: checks that it works")
    ap.add_argument("--data", choices=sorted(DATASETS), default="alpaca-cherry")
    ap.add_argument("--workdir", default="runs/bench-selection")
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model to tune and to score with")
    args = ap.parse_args()

    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    q = args.quick
    workdir = Path(args.workdir) / ("quick" if q else "full") / args.data
    files = split(DATASETS[args.data], 24 if q else 200, 4 if q else 16, 160 if q else None, workdir)
    steps, bs = args.steps or (8 if q else 150), 4 if q else 8
    prompts = if_prompts(8 if q else 60)
    max_new = 48 if q else 128
    ifd = {"batch_size": 8}
    table, results = [], {}
    for name, select in rows(ifd, str(files["target"])).items():
        if args.only and name not in args.only:
            continue
        recipe = {
            "name": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), "output_dir": str(workdir / "runs"),
            "model": {"name_or_path": args.model},
            "data": {"train": {"path": str(files["pool"])}, "eval": {"path": str(files["heldout"])},
                     "max_length": 768, "truncation": "right"},  # longest-response subsets stay whole-ish
            "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {"max_steps": steps, "batch_size": bs, "lr": 2e-4, "warmup_ratio": 0.1, "seed": 0},
            "eval": {"before": False, "after": True, "exact_match": False, "batch_size": 8},
            "export": {"adapter": False, "merged": True},
        }
        if select is not None:
            recipe["data"]["select"] = {"budget": args.budget, "cache_dir": str(workdir / "score-cache"), **select}
        t0 = time.perf_counter()
        try:
            summary = run_recipe(Recipe.model_validate(recipe), overwrite=True)
        except Exception as e:  # one failing row (e.g. a missing optional package) must not sink the table
            print(f"row {name!r} failed: {type(e).__name__}: {e}")
            table.append((name, "-", "failed", "-", "-"))
            continue
        run_dir = Path(summary["run_dir"])
        merged = summary["exports"].get("merged", "")
        score = if_score(merged, prompts, max_new) if Path(merged).is_dir() else float("nan")
        shutil.rmtree(run_dir / "export", ignore_errors=True)  # ~0.5 GB per row
        report = json.loads((run_dir / "select" / "report.json").read_text()) if select is not None else {}
        n_train = report.get("selected", sum(1 for _ in open(files["pool"])))
        results[name] = {"n_train": n_train, "n_scored": report.get("scored"),
                         "eval_loss": summary["after"].get("eval_loss"), "if_rouge_l": score,
                         "wall_s": time.perf_counter() - t0, "scoring": report.get("scoring", {})}
        table.append((name, str(n_train), f"{results[name]['eval_loss']:.4f}", f"{score:.4f}",
                      f"{results[name]['wall_s']:.0f}"))
    head = ("selector", "examples", "held-out loss", "IF ROUGE-L", "wall s")
    widths = [max(len(r[i]) for r in table + [head]) for i in range(5)]
    print(f"\n{args.data}: budget {args.budget}, {steps} steps of {bs}, LoRA r=16 on SmolLM2-135M-Instruct")
    for r in [head] + table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    base = results.get("random")
    if base:
        for name, r in results.items():
            if name not in ("random", "full pool") and r["eval_loss"] is not None:
                print(f"{name}: held-out loss {r['eval_loss'] - base['eval_loss']:+.4f}, "
                      f"ROUGE-L {r['if_rouge_l'] - base['if_rouge_l']:+.4f} vs random")
    for name, r in results.items():
        for scorer, t in r["scoring"].items():
            if scorer.startswith("ifd") and not t.get("cached"):
                print(f"IFD scoring ({scorer}, bf16, batch 8): {t['examples_per_s']:.2f} examples/s "
                      f"({r['n_scored']} pool examples, two forward passes each)")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
