"""A stand-in for `python -m tunelab.cli run RECIPE` in the sweep's tests: writes the run directory a real run
writes (recipe.yaml, metrics.jsonl line by line, eval_after.json, summary.json) in a fraction of a second, with
values that are pure functions of the recipe, so the worker loop, storage, pruning and results are tested
without training. `train.lr` above 0.5 crashes (exit code 3), as a diverging run would."""

import json
import sys
import time
from pathlib import Path

import yaml

recipe = yaml.safe_load(Path(sys.argv[-1]).read_text())
run = Path(recipe["output_dir"]) / recipe["name"]
run.mkdir(parents=True)  # a real run never reuses a directory either
(run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
lr, method = recipe["train"]["lr"], recipe["method"]
r = method.get("r", 1)
steps = recipe["train"]["max_steps"]
with (run / "metrics.jsonl").open("a") as f:
    for step in range(1, steps + 1):
        f.write(json.dumps({"step": step, "loss": 1.0 / (lr * step), "lr": lr}) + "\n")
        f.flush()
        time.sleep(float(recipe["train"].get("seed", 0)) / 100)  # train.seed = centiseconds per step
if lr > 0.5:
    sys.exit(3)
after = {"exact_match": min(1.0, lr * 10) + (0.01 if method["name"] == "lora" else 0.0), "eval_loss": 1.0 - lr}
(run / "eval_after.json").write_text(json.dumps(after))
(run / "summary.json").write_text(json.dumps({"method": method["name"], "after": after, "before": {},
                                              "peak_memory_mb": 100.0 + 10 * r, "wall_time_s": 1.0 + r}))
