"""One run: recipe -> workspace -> prepare (reference, method) -> eval before -> train -> eval after -> export
-> summary.

`run_recipe` is what `tunelab run` and `tunelab train` (with the evaluations switched off) call. Its pieces, which
benchmarks/methods.py also calls one by one:
  * `open_workspace`: the run directory, accelerator, tokenizer, data (after `data.select`), model, method and
    objective (`tunelab.assemble` builds the last two);
  * `prepare_workspace`: the objective's reference (workspace.py), then `tunelab.assemble.prepare_model` (seed, run
    length, calibration, `method.prepare`, the engine's switches, parameter counts);
  * `evaluate`: `tunelab.evaluate.heldout` and the recipe's `eval.suite`, saved as eval_<label>.json;
  * `train_workspace`: `tunelab.train.loop.train`.
`tunelab eval RUN` / `tunelab export RUN` do not come through here: they restore the run's model with
`tunelab.assemble.restore_run`. Every step logs what it does; the run directory keeps everything
(tunelab.core.rundir).
(`workspace.py`: directory, data, model, method, objective, reference; `evaluation.py`: held-out metrics,
suite, the table; this module: the order of the whole run.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.core.rundir import write_json
from tunelab.export import export_all
from tunelab.export_stops import stop_rate_warning
from tunelab.model import load_model
from tunelab.recipe import Recipe, RecipeError
from tunelab.runner.evaluation import evaluate, evaluate_suite, format_table
from tunelab.runner.workspace import (
    Workspace,
    make_accelerator,
    open_workspace,
    prepare_workspace,
    resolve_recipe_arg,
    resolve_run_precision,
    setup_reference,
    train_workspace,
)
from tunelab.train.loop import TrainResult
from tunelab.train.precision import restore_frozen_weights

__all__ = ["Workspace", "evaluate", "evaluate_suite", "format_table", "make_accelerator", "open_workspace",
           "prepare_workspace", "resolve_recipe_arg", "resolve_run_precision", "run_recipe", "setup_reference",
           "train_workspace"]


def run_recipe(recipe: Recipe, *, run_dir: Path | None = None, overwrite: bool = False, resume: bool = False,
               do_train: bool = True, do_export: bool = True) -> dict[str, Any]:
    """The whole main path. Returns the summary that is also saved as summary.json.

    `do_train=False` prepares and evaluates the starting point ("before") and exports it if `do_export`, without
    training it (no optimizer step, no checkpoint, no "after" evaluation: it would score the same model).
    """
    if recipe.iterate is not None:
        raise RecipeError("this recipe has an `iterate:` section: its rounds run with `tunelab iterate` (or `tunelab "
                          "run`), not as one training run")
    t0 = time.perf_counter()
    ws = open_workspace(recipe, run_dir=run_dir, overwrite=overwrite, resume=resume)
    recipe = ws.recipe  # train.precision resolved
    main, evaluates = ws.backend.is_main_process, ws.backend.is_eval_process
    before = after = None
    model = prepare_workspace(ws)  # method applied and reference set up: "before" sees the starting point
    if recipe.eval.before and not resume and evaluates:
        ws.accelerator.print("evaluating the base model ...")
        before = evaluate(ws, model, "before")
    elif resume and (ws.run_dir / "eval_before.json").is_file():
        before = json.loads((ws.run_dir / "eval_before.json").read_text())
    ws.accelerator.wait_for_everyone()
    result: TrainResult | None = None
    if do_train:
        model, result, _ = train_workspace(ws, resume=resume)  # trains `model` (ws.prepared)
    if do_train and recipe.eval.after and evaluates:
        ws.accelerator.print("evaluating the trained model ...")
        after = evaluate(ws, model, "after")
    exports: dict[str, str] = {}
    if do_export and (recipe.export.adapter or recipe.export.merged):
        # the trained model, unsharded, on the main process (sharded backends gather it: every process calls this)
        full = ws.backend.export_model(model)
        if main:
            print("exporting ...")
            if recipe.export.merged:
                # frozen weights were stored in the compute dtype for training: merge into the original
                # full-precision base
                restore_frozen_weights(full, load_model(recipe.model, head=ws.objective.head).state_dict())
            exports = export_all(ws.method, full, ws.tokenizer, ws.run_dir / "export",
                                 adapter=recipe.export.adapter, merged=recipe.export.merged, gguf=recipe.export.gguf)
    stop_warning = stop_rate_warning(before, after)
    summary = {
        "run_dir": str(ws.run_dir), "method": recipe.method.name, "objective": recipe.objective.name,
        "precision": recipe.train.precision, **ws.params, "data": ws.data_stats,
        "steps": result.steps if result else 0, "final_train_loss": result.final_loss if result else None,
        "train_time_s": result.wall_time_s if result else 0.0, "tokens_per_s": result.tokens_per_s if result else None,
        "peak_memory_mb": result.peak_memory_mb if result else None,
        "before": {k: v for k, v in (before or {}).items() if k != "samples"},
        "after": {k: v for k, v in (after or {}).items() if k != "samples"},
        "exports": exports, "wall_time_s": time.perf_counter() - t0,
        **({"warnings": [stop_warning]} if stop_warning else {}),
    }
    if main:
        write_json(ws.run_dir, "summary.json", summary)
        print()
        print(format_table(before, after))
        if result is not None:
            print(f"\ntrained {result.steps} steps in {result.wall_time_s:.0f} s ({result.tokens_per_s:.0f} tokens/s, "
                  f"peak memory {result.peak_memory_mb:.0f} MB); total {summary['wall_time_s']:.0f} s")
        else:
            print(f"\nnot trained (do_train=False); total {summary['wall_time_s']:.0f} s")
        print(f"run directory: {ws.run_dir}")
        if stop_warning:
            print(f"\n{stop_warning}", file=sys.stderr)
    ws.accelerator.end_training()
    return summary
