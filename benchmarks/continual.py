"""Benchmark: continual fine-tuning of SmolLM2-135M-Instruct on a stream of three built-in tasks.

What it measures: how much of each earlier task, and of general ability, survives a stream of fine-tunes,
for every strategy of `tunelab.continual`, with LoRA and with full fine-tuning, against the joint
(multi-task) upper bound. It checks the seed claim "LoRA learns less and forgets less" on this stream.

  stream      date_format -> arithmetic -> sort_numbers (built-in tasks), `--steps` optimizer steps each
              (batch 8, bf16 autocast; LoRA r=16 alpha=32 lr 1e-3, full fine-tuning lr 5e-5), each a
              `tunelab continual` run (tunelab.continual.stream.run_continual) in --workdir
  rows        for each method: naive, replay, gere, ewc, l2, lwf, ilora, lines, and olora (LoRA only) or hft
              (full fine-tuning only: the hft method re-drawn per stage); the joint upper bound of the
              method (all three tasks at once, the same total steps)
  columns     ACC (mean exact match on the 3 tasks after the last stage), BWT (T-1 divisor), forgetting
              (score just after learning a task - final, mean over the first two), FWT, the change of
              WikiText-2 bits per byte and of ARC-Easy acc_norm after the stream (general retention),
              training time (the stages' training + strategy work, not evaluation), trainable %
General data: ../shared/data/wikitext-2/test.txt (perplexity), ../shared/data/arc-easy/test.jsonl (multiple
choice); GeRe replays ../shared/data/wikitext-2/valid.txt (disjoint from the perplexity text).
Finished runs are reused (their summary.json); --retrain redoes them.

Run:  python benchmarks/continual.py --quick      (2 steps per stage, 4 held-out items, 8 generated tokens, the
                                                  base evaluated in the naive rows only, so FWT and general
                                                  retention only there: checks that every row runs)
      python benchmarks/continual.py              (60 steps per stage, 100 held-out items per task)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:
    import tunelab  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ["date_format", "arithmetic", "sort_numbers"]


def strategies(method: str, gere_texts: str, quick: bool = False) -> dict[str, list[dict]]:
    small = 4 if quick else 64  # Fisher examples and GeRe rows (per-example backward passes are the cost)
    rows = {
        "naive": [],
        "replay": [{"name": "replay", "buffer_size": 200, "ratio": 0.2}],
        "gere": [{"name": "gere", "texts": gere_texts, "n_samples": small, "max_tokens": 128, "batch_size": 2}],
        "ewc": [{"name": "ewc", "weight": 1000.0, "fisher_samples": small}],
        "l2": [{"name": "l2", "weight": 1.0}],
        "lwf": [{"name": "lwf", "weight": 1.0, "temperature": 2.0}],
        "ilora": [{"name": "ilora", "decay": 0.9}],
        "lines": [{"name": "lines"}],
    }
    if method == "lora":
        rows["olora"] = [{"name": "olora", "lambda_1": 0.5}]
    else:
        rows["hft"] = [{"name": "hft"}]
    return rows


def recipe(args, method: str, name: str, strategy: list[dict], joint: bool) -> dict:
    m = {"name": "lora", "r": 16, "alpha": 32} if method == "lora" else {"name": "full"}
    if strategy and strategy[0]["name"] == "hft":
        m = {"name": "hft"}
    lr = 1e-3 if method == "lora" else 5e-5
    return {
        "name": name, "output_dir": str(args.workdir / "runs"),
        "base": {
            "model": {"name_or_path": args.model},
            "data": {"max_length": 128},
            "method": m,
            "train": {"max_steps": args.steps, "batch_size": 8, "lr": lr, "warmup_ratio": 0.1, "precision": "bf16",
                      "seed": 0},
            # quick: short answers, the untrained model evaluated in the naive rows only (elsewhere FWT and the
            # general-ability changes, which compare with it, show "-")
            "eval": {"max_new_tokens": 8 if args.quick else 24, "batch_size": 32,
                     "before": not args.quick or not strategy},
            "export": {"adapter": False, "merged": False},
        },
        "stages": [{"builtin": t, "n": max(64, args.steps * 8), "eval_n": args.n_eval} for t in TASKS],
        "strategy": strategy,
        "general": {"ppl": [str(SHARED / "wikitext-2" / "test.txt")], "mc": [str(SHARED / "arc-easy" / "test.jsonl")],
                    "n": args.n_mc, "ppl_max_chars": args.ppl_chars},
        "joint": joint,
    }


def run_one(args, method: str, label: str, strategy: list[dict], joint: bool) -> dict:
    from tunelab.continual.recipe import parse_continual_recipe
    from tunelab.continual.stream import run_continual

    name = f"{method}-{label}"
    run = args.workdir / "runs" / name
    summary = run / "summary.json"
    if not args.retrain and summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("stages") and s["stages"][0]["steps"] == args.steps and (s.get("joint") or not joint):
            print(f"[{name}] reusing {run}")
            return s
    t0 = time.perf_counter()
    s = run_continual(parse_continual_recipe(recipe(args, method, name, strategy, joint)), overwrite=True,
                      progress=not args.quiet)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    return s


def general_change(summary: dict, kind: str) -> float | None:
    for name, g in (summary["metrics"].get("general_retention") or {}).items():
        if name.startswith(kind + ":"):
            return g["change"]
    return None


def fmt(v, pct=False, signed=False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"
    return f"{v:+.3f}" if signed else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 steps per stage, 4 held-out items (a smoke run)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-mc", type=int, default=200)
    ap.add_argument("--ppl-chars", type=int, default=50_000)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--only", default=None, help="comma-separated strategy rows to run (default: all)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workdir", type=Path, default=Path("bench-continual"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.n_eval, args.n_mc, args.ppl_chars = 2, 4, 2, 1_000
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    args.workdir.mkdir(parents=True, exist_ok=True)
    gere_texts = str(SHARED / "wikitext-2" / "valid.txt")

    rows = []
    for method in args.methods.split(","):
        for label, strat in strategies(method, gere_texts, args.quick).items():
            if args.only and label not in args.only.split(","):
                continue
            s = run_one(args, method, label, strat, joint=(label == "naive"))
            m = s["metrics"]
            rows.append({"method": method, "strategy": label, "ACC": m.get("ACC"), "BWT": m.get("BWT"),
                         "forgetting": m.get("forgetting"), "forgetting_max": m.get("forgetting_max"),
                         "FWT": m.get("FWT"), "d_bpb": general_change(s, "ppl"), "d_arc": general_change(s, "mc"),
                         "train_time_s": s["train_time_s"], "trainable_pct": s["trainable_pct"],
                         "joint_ACC": m.get("joint_ACC"), "joint_time_s": (s.get("joint") or {}).get("train_time_s")})
    head = (f"{'method':<6} {'strategy':<14} {'ACC %':>6} {'BWT pts':>8} {'forget pts':>10} {'FWT pts':>8} "
            f"{'d bpb':>7} {'d ARC pts':>9} {'train s':>8} {'trainable %':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['method']:<6} {r['strategy']:<14} {fmt(r['ACC'], True):>6} {fmt(r['BWT'], True, True):>8} "
              f"{fmt(r['forgetting'], True, True):>10} {fmt(r['FWT'], True, True):>8} "
              f"{fmt(r['d_bpb'], signed=True):>7} "
              f"{fmt(r['d_arc'], True, True):>9} {fmt(r['train_time_s']):>8} {r['trainable_pct']:>11.3f}")
        if r["joint_ACC"] is not None:
            print(f"{r['method']:<6} {'joint (upper)':<14} {fmt(r['joint_ACC'], True):>6} {'':>8} {'':>10} {'':>8} "
                  f"{'':>7} {'':>9} {fmt(r['joint_time_s']):>8}")
    print(f"\n{args.steps} steps per stage, {args.n_eval} held-out items per task; BWT with the T-1 divisor; "
          "forgetting = just-after-learning minus final (mean over the first two tasks); d bpb = WikiText-2 bits per "
          "byte after - before (lower is better); d ARC = ARC-Easy acc_norm after - before.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
