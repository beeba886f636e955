"""Train every method that declares `supports_sharding` (and the objectives on LoRA and full fine-tuning) for a few
steps under one backend; one JSON file of losses and exports per run. For test_sharded_methods.py:

    python tests/train/sharded_methods_run.py OUT_DIR MODEL_DIR BACKEND            (1 process, grad_accum 2)
    python -m torch.distributed.run --nproc_per_node 2 tests/train/sharded_methods_run.py OUT_DIR MODEL_DIR BACKEND

Every run goes through `runner.run_recipe` (validation, workspace, training, export) in this one process group.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from tiny import TINY_METHOD_OPTIONS, tiny_recipe_dict

STEPS = 3
OBJECTIVES = [("lora", o) for o in ("dpo", "simpo", "orpo", "kto", "asft", "dft", "distill", "reward")] + \
             [("full", o) for o in ("dpo", "simpo", "orpo", "kto", "asft", "distill", "reward")]
PAIRS = {"dpo", "simpo", "orpo", "kto", "reward"}  # reward: a scalar-head model trained on the same pairs


def combos() -> list[tuple[str, str]]:
    from tunelab.methods.registry import list_methods

    sharded = sorted(n for n, c in list_methods().items() if c.capabilities.supports_sharding)
    return [(m, "sft") for m in sharded] + OBJECTIVES


def recipe(out: Path, model_dir: str, backend: str, method: str, objective: str) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    obj: dict = {"name": objective}
    if objective == "distill":
        obj["teacher"] = model_dir
    if objective == "asft":
        obj["kl_coef"] = 0.1
    opts = {"lora": {"r": 4, "alpha": 8}}.get(method, TINY_METHOD_OPTIONS.get(method, {}))
    data = {"train": {"builtin": "date_format_pref" if objective in PAIRS else "date_format", "n": 48},
            "eval": None, "max_length": 96}
    d = tiny_recipe_dict(model_dir, out / "runs", name=f"{backend}-{world}-{method}-{objective}", data=data,
                         method={"name": method, **opts}, objective=obj,
                         train={"max_steps": STEPS, "batch_size": 4, "grad_accum": 2 // world, "lr": 1e-3,
                                "precision": "fp32", "save_every": None},
                         eval={"before": False, "after": False},
                         distributed={"backend": backend, "deepspeed": {"zero_stage": 3}})
    d["export"] = {"adapter": True, "merged": True}
    return d


def main() -> None:
    import accelerate

    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    # run_recipe ends with accelerator.end_training(), which destroys the process group: keep it for the next run
    accelerate.Accelerator.end_training = lambda self: None
    out, model_dir, backend = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    results = {}
    for method, objective in combos():
        d = recipe(out, model_dir, backend if world > 1 else "ddp", method, objective)
        try:
            summary = run_recipe(Recipe.model_validate(d), overwrite=True)
            metrics = (out / "runs" / d["name"] / "metrics.jsonl").read_text().splitlines()
            results[f"{method}:{objective}"] = {"losses": [json.loads(x)["loss"] for x in metrics],
                                                "exports": summary["exports"]}
        except Exception as e:  # noqa: BLE001 - recorded; the test names it
            results[f"{method}:{objective}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            if rank == 0:
                traceback.print_exc()
    if rank == 0:
        (out / f"{backend if world > 1 else 'one'}-{world}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
