"""A stand-in for `python -m tunelab.cli` in the board's API tests: `run RECIPE` and `run RUN_DIR --resume` write
what a run writes (recipe.yaml, metrics.jsonl line by line, eval_after.json, summary.json) without training.
`train.seed` = centiseconds per step (so a test can stop a run mid-way); `train.lr` above 0.5 crashes (exit 3)."""

import json
import sys
import time
from pathlib import Path

import yaml

args = sys.argv[1:]
assert args[0] == "run", args
if args[-1] == "--resume":
    run = Path(args[1])
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    done = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").is_file() else 0
else:
    recipe = yaml.safe_load(Path(args[1]).read_text())
    run = Path(recipe["output_dir"]) / recipe["name"]
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = 0
print(f"run directory: {run}", flush=True)
lr, steps = recipe["train"]["lr"], recipe["train"]["max_steps"] or 3
with (run / "metrics.jsonl").open("a") as f:
    for step in range(done + 1, steps + 1):
        f.write(json.dumps({"step": step, "loss": 2.0 / step, "lr": lr, "tokens_per_s": 100.0, "memory_mb": 50.0})
                + "\n")
        f.flush()
        time.sleep(recipe["train"]["seed"] / 100)
if lr > 0.5:
    print("Traceback: loss is nan", flush=True)
    sys.exit(3)
after = {"exact_match": 0.5, "eval_loss": 1.0, "samples": [{"prompt": "p", "answer": "a", "prediction": "a",
                                                              "correct": True}]}
(run / "eval_after.json").write_text(json.dumps(after))
(run / "summary.json").write_text(json.dumps({"method": recipe["method"]["name"], "after": after, "before": {},
                                              "peak_memory_mb": 50.0, "tokens_per_s": 100.0, "wall_time_s": 1.0}))
