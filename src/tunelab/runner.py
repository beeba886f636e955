"""One run: recipe -> workspace -> prepare (reference, method) -> eval before -> train -> eval after -> export
-> summary.

`run_recipe` is what `tunelab run` and `tunelab train` (with the evaluations switched off) call. Its pieces, which
benchmarks/methods.py also calls one by one:
  * `open_workspace`: the run directory, accelerator, tokenizer, data (after `data.select`), model, method and
    objective (`tunelab.assemble` builds the last two);
  * `prepare_workspace`: the objective's reference (below), then `tunelab.assemble.prepare_model` (seed, run
    length, calibration, `method.prepare`, the engine's switches, parameter counts);
  * `evaluate`: `tunelab.evaluate.heldout` and the recipe's `eval.suite`, saved as eval_<label>.json;
  * `train_workspace`: `tunelab.train.loop.train`.
`tunelab eval RUN` / `tunelab export RUN` do not come through here: they restore the run's model with
`tunelab.assemble.restore_run`. Every step logs what it does; the run directory keeps everything
(tunelab.track.run).

`prepare_workspace` sets up what the objective needs of a reference model (`Objective.reference_use`) before
the method is applied and before the "before" evaluation, so that both evaluations score the same kind of model
with the same reference:
  * adapter methods: the base with the adapter disabled (no copy; the objectives' default, `ref` stays None);
  * DPO on any other method: the reference log-probs of every training and evaluation pair, computed once with
    the initial model and cached in the run directory (`objectives/reference_cache.py`), ride in the batches;
  * a live reference on a non-adapter method (KTO, the SFT KL anchor of ASFT) and distillation's teacher: a
    frozen copy of the initial model (`FrozenCopyReference`; the teacher may be another model).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.assemble import build_method_for, build_objective_for, prepare_model
from tunelab.data.pipeline import EvalItem, encode_spec, eval_items
from tunelab.methods.registry import Method
from tunelab.model import load_model, load_tokenizer
from tunelab.objectives.base import Objective
from tunelab.recipe import Recipe, RecipeError, recipe_to_yaml
from tunelab.track.run import new_run_dir, write_json
from tunelab.train.backends import Backend, backend_class, build_backend
from tunelab.train.loop import TrainResult, train
from tunelab.train.precision import cast_frozen_linears, frozen_dtype_for, restore_frozen_weights
from tunelab.train.sources import StaticBatchSource
from tunelab.validate import load_validated_recipe

log = logging.getLogger("tunelab")


def make_accelerator(recipe: Recipe, run_dir: Path):
    from accelerate import Accelerator

    from tunelab.track.trackers import tracker_kwargs

    return Accelerator(cpu=not torch.cuda.is_available(), **tracker_kwargs(recipe.tracking, run_dir, recipe.name))


def resolve_recipe_arg(path: str | None, overrides: list[str]) -> tuple[Recipe, Path | None]:
    """A recipe file, or a run directory (its saved recipe.yaml; the run continues in that directory)."""
    if path is not None and Path(path).is_dir():
        saved = Path(path) / "recipe.yaml"
        if not saved.is_file():
            raise RecipeError(f"{path} is a directory without a recipe.yaml: not a run directory")
        return load_validated_recipe(saved, overrides), Path(path)
    return load_validated_recipe(path, overrides), None


def shared_run_dir(recipe: Recipe, *, overwrite: bool, resume: bool) -> Path:
    """The main process picks (and creates) the run directory; every other process is told its name."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())
    chosen = [None]
    if state.is_main_process:
        chosen = [str(new_run_dir(recipe.output_dir, recipe.name, overwrite=overwrite, resume=resume))]
    if state.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


@dataclass
class Workspace:
    """Everything loaded for a run, so train/eval/export can share it."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    tokenizer: Any
    model: Any
    method: Method
    objective: Objective
    train_data: list[dict] | None
    eval_data: list[dict] | None
    eval_items: list[EvalItem]
    ref: Any = None  # the reference the loop and the evaluations pass to the objective (None: none or adapter-off)
    prepared: Any = None  # the model after `method.prepare` (set by prepare_workspace)
    params: dict = field(default_factory=dict)  # trainable / total parameter counts of the prepared model
    engine: dict = field(default_factory=dict)  # what train.engine.configure_engine applied
    backend: Backend | None = None  # the distributed backend (`distributed.backend`); built from the recipe if None

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = build_backend(self.recipe, self.accelerator)


def open_workspace(recipe: Recipe, *, run_dir: Path | None = None, overwrite: bool = False, resume: bool = False,
                   need_train: bool = True) -> Workspace:
    make_backend = backend_class(recipe.distributed)  # an unavailable backend is refused before any run dir exists
    if run_dir is None:
        run_dir = shared_run_dir(recipe, overwrite=overwrite, resume=resume)
    accelerator = make_accelerator(recipe, run_dir)
    if recipe.tracking.tensorboard or recipe.tracking.wandb or recipe.tracking.mlflow:
        accelerator.init_trackers(recipe.name, config={"method": recipe.method.name, "lr": recipe.train.lr,
                                                       "batch_size": recipe.train.batch_size})
    if accelerator.is_main_process:
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    accelerator.print(f"run directory: {run_dir}")
    tokenizer = load_tokenizer(recipe.model)
    method, objective = build_method_for(recipe), build_objective_for(recipe)
    train_data = None
    if need_train:
        train_spec = recipe.data.train
        if recipe.data.select is not None:  # score + select first; training reads the subset file
            from tunelab.selection.run import select_for_recipe

            train_spec = select_for_recipe(recipe, run_dir, accelerator)
        train_data, stats = encode_spec(tokenizer, train_spec, recipe.data)
        accelerator.print(f"train data: {stats.summary()}")
    eval_data, items = None, []
    if recipe.data.eval is not None:
        # held-out data is scored on the responses only: instruction-modelling weights are for training
        eval_cfg = recipe.data.model_copy(update={"prompt_loss_weight": None})
        eval_data, stats = encode_spec(tokenizer, recipe.data.eval, eval_cfg)
        if recipe.eval.n:
            eval_data = eval_data[: recipe.eval.n]
        if recipe.data.eval.builtin and recipe.eval.exact_match:
            items = eval_items(recipe.data.eval, recipe.data)[: recipe.eval.n or None]
    model = load_model(recipe.model)
    return Workspace(recipe, run_dir, accelerator, tokenizer, model, method, objective, train_data, eval_data, items,
                     backend=make_backend(accelerator))


def evaluate(ws: Workspace, model, label: str) -> dict[str, Any]:
    """Held-out metrics of `model` on the run's eval data (`tunelab.evaluate.heldout`, with the run's objective
    and reference for preference pairs), plus the `eval.suite` tasks' primary metrics under "suite" (full results
    in eval_suite_<label>.json); saved as eval_<label>.json."""
    from tunelab.evaluate.heldout import HeldOutSettings, heldout_metrics

    t0 = time.perf_counter()
    ev = ws.recipe.eval
    settings = HeldOutSettings(batch_size=ev.batch_size, precision=ws.recipe.train.precision,
                               max_new_tokens=ev.max_new_tokens, device=ws.accelerator.device)
    results: dict[str, Any] = {"label": label}
    results.update(heldout_metrics(model, ws.tokenizer, ws.eval_data, ws.eval_items, settings, objective=ws.objective,
                                   ref=ws.ref))
    if ev.suite:
        results["suite"] = evaluate_suite(ws, model, label)
    results["eval_time_s"] = time.perf_counter() - t0
    if ws.accelerator.is_main_process:
        write_json(ws.run_dir, f"eval_{label}.json", results)
    return results


def evaluate_suite(ws: Workspace, model, label: str) -> dict[str, float | None]:
    """`eval.suite` on `model`, written as eval_suite_<label>.json (the layout `tunelab eval` writes, which
    `tunelab report` reads); returns {task: primary metric} for the run's table. A failing task is recorded
    with its error and costs only itself."""
    from tunelab.evaluate.suite import SuiteSettings, run_suite, suite_record

    ev, t0 = ws.recipe.eval, time.perf_counter()
    settings = SuiteSettings(n=ev.suite_n, batch_size=ev.batch_size, precision=ws.recipe.train.precision,
                             max_new_tokens=ev.max_new_tokens)
    suite = run_suite(model, ws.tokenizer, list(ev.suite), settings, data_cfg=ws.recipe.data)
    if ws.accelerator.is_main_process:
        write_json(ws.run_dir, f"eval_suite_{label}.json", suite_record(
            str(ws.run_dir), label, ws.recipe.model.name_or_path, label == "before", suite, time.perf_counter() - t0))
    return {name: (r.get(r.get("primary", "")) if "error" not in r else None) for name, r in suite["tasks"].items()}


def model_key(recipe: Recipe) -> str:
    """What identifies the initial model in the reference cache's hash (with the data and the precision)."""
    m = recipe.model
    return f"{m.name_or_path}|{m.gguf_file}|{m.revision}|{m.dtype}"


def setup_reference(ws: Workspace) -> None:
    """Give the objective its reference (see the module docstring); call with the INITIAL model, before
    `method.prepare`. Sets `ws.ref`, or attaches cached reference log-probs to the training and eval pairs."""
    from tunelab.objectives.reference_cache import (
        attach_reference_logps,
        needs_reference_logps,
        precompute_reference_logps,
    )
    from tunelab.objectives.references import FrozenCopyReference

    use = ws.objective.reference_use()
    adapter = ws.method.capabilities.is_adapter
    device, acc = ws.accelerator.device, ws.accelerator
    if use == "model" or (use == "live" and not adapter):
        teacher = getattr(ws.objective.config, "teacher", None)
        if teacher:
            ref_model = load_model(ws.recipe.model.model_copy(update={"name_or_path": teacher, "gguf_file": None,
                                                                     "revision": None}))
            what = f"the teacher {teacher}"
        else:
            ref_model = copy.deepcopy(ws.model)
            what = "a frozen copy of the initial model"
        ws.ref = FrozenCopyReference(ref_model.to(device))
        cast_frozen_linears(ref_model, frozen_dtype_for(ws.recipe.train.frozen_dtype, ws.recipe.train.precision),
                            everything=ws.recipe.train.frozen_cast == "all")
        acc.print(f"reference: {what}")
    elif use == "logps" and needs_reference_logps(ws.objective, ws.method):
        from tunelab.evaluate.heldout import is_pairs

        ws.model.to(device)
        sets = [("train", ws.train_data), ("eval", ws.eval_data if is_pairs(ws.eval_data) else None)]
        for name, data in sets:
            if not data:
                continue
            kwargs = dict(batch_size=ws.recipe.eval.batch_size, pad_id=ws.tokenizer.pad_token_id, device=device,
                          precision=ws.recipe.train.precision, cache_dir=ws.run_dir, model_key=model_key(ws.recipe))
            if acc.is_main_process:  # computes (or loads) and writes the cache; the others then load it
                logps = precompute_reference_logps(ws.model, data, **kwargs)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                logps = precompute_reference_logps(ws.model, data, **kwargs)
            attach_reference_logps(data, logps)
            acc.print(f"reference: log-probs of {len(data)} {name} pairs under the initial model, cached in the run "
                      "directory")
    elif use != "none":
        acc.print("reference: the base model with the adapter disabled")


def prepare_workspace(ws: Workspace):
    """Set the reference up, then prepare the model through `tunelab.assemble.prepare_model` (calibration, run
    length, method.prepare, the engine's switches, parameter counts); returns the model to train (kept in
    `ws.prepared`).

    Idempotent: the second call returns the same model. `run_recipe` calls it before the "before" evaluation,
    which therefore scores the model training starts from (for LoRA-style adapters, whose update starts at
    zero, that is the base model).
    """
    if ws.prepared is not None:
        return ws.prepared
    setup_reference(ws)
    prepared = prepare_model(ws.recipe, ws.model, ws.method, ws.objective, train_data=ws.train_data,
                             pad_id=ws.tokenizer.pad_token_id, device=ws.accelerator.device,
                             world_size=ws.accelerator.num_processes)
    ws.engine, ws.params = prepared.engine, prepared.params
    ws.accelerator.print(prepared.describe())
    ws.prepared = prepared.model
    return ws.prepared


def train_workspace(ws: Workspace, *, resume: bool = False, on_step=None) -> tuple[Any, TrainResult, dict]:
    """Prepare the model (if `prepare_workspace` has not) and train it; returns (trained model, result, counts)."""
    model = prepare_workspace(ws)
    source = StaticBatchSource.from_recipe(ws.recipe, ws.train_data, batch_kind=ws.objective.batch_kind,
                                           pad_id=ws.tokenizer.pad_token_id, backend=ws.backend)
    result = train(ws.recipe, model, ws.method, ws.objective, source, run_dir=ws.run_dir, backend=ws.backend,
                   pad_id=ws.tokenizer.pad_token_id, eval_data=ws.eval_data, resume=resume, ref=ws.ref,
                   on_step=on_step)
    return model, result, ws.params


TABLE_ROWS = (  # (key in eval_<label>.json, label, shown as a percentage)
    ("exact_match", "exact match", True),
    ("stop_rate", "stop rate", True),
    ("reward_accuracy", "reward accuracy", True),
    ("preference_accuracy", "preference accuracy", True),
    ("rewards/margins", "reward margin", False),
    ("logps/chosen", "log-prob chosen", False),
    ("logps/rejected", "log-prob rejected", False),
    ("eval_loss", "held-out loss", False),
    ("perplexity", "perplexity", False),
)


def format_table(before: dict | None, after: dict | None) -> str:
    rows = []
    for key, label, pct in TABLE_ROWS:
        b = before.get(key) if before else None
        a = after.get(key) if after else None
        if b is None and a is None:
            continue
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
        rows.append((label, fmt(b) if b is not None else "-", fmt(a) if a is not None else "-"))
    suite_b, suite_a = (before or {}).get("suite") or {}, (after or {}).get("suite") or {}
    for name in dict.fromkeys([*suite_b, *suite_a]):
        b, a = suite_b.get(name), suite_a.get(name)
        rows.append((name, f"{b:.4f}" if b is not None else "-", f"{a:.4f}" if a is not None else "-"))
    if not rows:
        return "(no evaluation)"
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'before':>10}  {'after':>10}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}" for r in rows]
    return "\n".join(lines)


def run_recipe(recipe: Recipe, *, run_dir: Path | None = None, overwrite: bool = False, resume: bool = False,
               do_train: bool = True, do_export: bool = True) -> dict[str, Any]:
    """The whole main path. Returns the summary that is also saved as summary.json.

    `do_train=False` prepares and evaluates the starting point ("before") and exports it if `do_export`, without
    training it (no optimizer step, no checkpoint, no "after" evaluation: it would score the same model).
    """
    from tunelab.export import export_all
    from tunelab.export_stops import stop_rate_warning

    t0 = time.perf_counter()
    ws = open_workspace(recipe, run_dir=run_dir, overwrite=overwrite, resume=resume)
    main, evaluates = ws.backend.is_main_process, ws.backend.is_eval_process
    before = after = None
    model = prepare_workspace(ws)  # method applied and reference set up: "before" sees the starting point
    if recipe.eval.before and not resume and evaluates:
        print("evaluating the base model ...")
        before = evaluate(ws, model, "before")
    elif resume and (ws.run_dir / "eval_before.json").is_file():
        import json

        before = json.loads((ws.run_dir / "eval_before.json").read_text())
    ws.accelerator.wait_for_everyone()
    result: TrainResult | None = None
    if do_train:
        model, result, _ = train_workspace(ws, resume=resume)  # trains `model` (ws.prepared)
    if do_train and recipe.eval.after and evaluates:
        print("evaluating the trained model ...")
        after = evaluate(ws, model, "after")
    exports: dict[str, str] = {}
    if do_export and main:
        print("exporting ...")
        if recipe.export.merged:
            # frozen weights were stored in bf16 for training: merge into the original full-precision base
            restore_frozen_weights(model, load_model(recipe.model).state_dict())
        exports = export_all(ws.method, model, ws.tokenizer, ws.run_dir / "export",
                             adapter=recipe.export.adapter, merged=recipe.export.merged, gguf=recipe.export.gguf)
    stop_warning = stop_rate_warning(before, after)
    summary = {
        "run_dir": str(ws.run_dir), "method": recipe.method.name, "objective": recipe.objective.name, **ws.params,
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
