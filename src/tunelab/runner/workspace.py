"""A run's workspace: its directory (locked), accelerator and backend, tokenizer, data, model, method and objective
(`open_workspace`), the objective's reference and the prepared model (`prepare_workspace`), and training it
(`train_workspace`). The orchestration of a whole run is `tunelab.runner.run_recipe`; its evaluation
`tunelab.runner.evaluation`.

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
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.assemble import build_method_for, build_objective_for, prepare_model
from tunelab.core.precision import explain_precision
from tunelab.core.rundir import new_run_dir
from tunelab.data.pipeline import EvalItem, encode_spec, eval_items
from tunelab.methods.registry import Method
from tunelab.model import load_model, load_tokenizer
from tunelab.objectives.base import Objective
from tunelab.recipe import Recipe, RecipeError, recipe_to_yaml
from tunelab.train.backends import Backend, backend_class, build_backend
from tunelab.train.loop import TrainResult, train
from tunelab.train.precision import cast_frozen_linears, frozen_dtype_for
from tunelab.train.sources import StaticBatchSource
from tunelab.validate import check_data_fits, load_validated_recipe, validate_recipe

log = logging.getLogger("tunelab")


def resolve_run_precision(recipe: Recipe) -> tuple[Recipe, str]:
    """The recipe with `train.precision` resolved (`auto` -> bf16/fp16/fp32) for the device this process
    computes on, and why (printed where the run starts). Done once per run: everything downstream (loop,
    evaluations, frozen dtype, attention, reference cache key) reads the resolved value."""
    from accelerate import PartialState

    device = PartialState(cpu=not torch.cuda.is_available()).device
    precision, reason = explain_precision(recipe.train.precision, device)
    train = recipe.train.model_copy(update={"precision": precision})
    return recipe.model_copy(update={"train": train}), reason


def make_accelerator(recipe: Recipe, run_dir: Path):
    """The run's Accelerator; `recipe.train.precision` must be resolved (`resolve_run_precision`).

    fp16 on a GPU gets accelerate's `mixed_precision="fp16"`: its GradScaler scales the loss in
    `accelerator.backward`, unscales in `clip_grad_norm_` and skips steps with inf/NaN gradients in the
    prepared optimizer's `step` (fp16's range needs loss scaling; bf16's does not)."""
    from accelerate import Accelerator

    from tunelab.track.trackers import tracker_kwargs

    cuda = torch.cuda.is_available()
    amp = {"mixed_precision": "fp16"} if cuda and recipe.train.precision == "fp16" else {}
    return Accelerator(cpu=not cuda, **amp, **tracker_kwargs(recipe.tracking, run_dir, recipe.name))


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
    prompts: list | None = None  # on-line RL (a `rollout` section): the training prompts; train_data is then None
    data_stats: dict = field(default_factory=dict)  # "train" / "eval": EncodeStats.as_dict() (kept, truncated, ...)

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = build_backend(self.recipe, self.accelerator)


def open_workspace(recipe: Recipe, *, run_dir: Path | None = None, overwrite: bool = False, resume: bool = False,
                   need_train: bool = True) -> Workspace:
    """Load and check everything a run needs, then claim its run directory: fail early, leave nothing.

    The tokenizer, the data (and that its format fits the objective), the model and, on resume, the checkpoint
    to resume from are checked BEFORE a new run directory is created; a directory created here is removed
    again if anything after that fails (data selection, trackers). The main process holds the run directory's
    lock (core/rundir.lock_run_dir) until the Workspace is garbage-collected or the process exits; on resume
    it takes the lock first (a second writer is refused before any work) and removes the orphans a killed run
    left in checkpoints/.
    """
    from accelerate import PartialState

    from tunelab.core.io import atomic_write_text, remove_orphans
    from tunelab.core.rundir import MetricsLog, discard_if_unstarted, lock_of, lock_run_dir
    from tunelab.train.checkpoint import check_resumable, clean_checkpoints

    make_backend = backend_class(recipe)  # a backend that cannot run is refused before any run dir exists
    asked = recipe  # saved as written: `precision: auto` stays auto, so the run resumes right on another machine
    recipe, why = resolve_run_precision(recipe)
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    created, lock = False, None  # `lock`: the main process's hold on run_dir, released with the Workspace
    if run_dir is None and resume:
        run_dir = shared_run_dir(recipe, overwrite=overwrite, resume=resume)  # the existing one, locked (main)
        lock = lock_of(run_dir) if main else None
    elif run_dir is not None and main:
        lock = lock_run_dir(run_dir)
    try:
        if run_dir is not None and main:
            orphans = [*remove_orphans(run_dir), *remove_orphans(run_dir / "export"), *clean_checkpoints(run_dir)]
            for orphan in orphans:
                log.warning("removed %s (left by an interrupted run)", orphan)
            if resume and check_resumable(run_dir) is None:  # the loop starts from step 0: forget logged steps
                MetricsLog(run_dir).truncate_after(0)
        validate_recipe(recipe)  # also for recipes built in code: registered names, options, built-in tasks
        tokenizer = load_tokenizer(recipe.model)
        method, objective = build_method_for(recipe), build_objective_for(recipe)
        train_data = stats = prompts = None
        if need_train and recipe.rollout is not None:  # on-line RL: prompts (checked against the rewards) instead
            from tunelab.rollouts import load_rollout_prompts

            prompts = load_rollout_prompts(recipe)
        elif need_train and recipe.data.select is None:
            train_data, stats = encode_spec(tokenizer, recipe.data.train, recipe.data)
            check_data_fits(objective, method, train_data, recipe.data.train)
        eval_data, eval_stats, items = None, None, []
        if recipe.data.eval is not None:
            # held-out data is scored on the responses only: instruction-modelling weights are for training
            eval_cfg = recipe.data.model_copy(update={"prompt_loss_weight": None})
            eval_data, eval_stats = encode_spec(tokenizer, recipe.data.eval, eval_cfg)
            if recipe.eval.n:
                eval_data = eval_data[: recipe.eval.n]
            if recipe.data.eval.builtin and recipe.eval.exact_match:
                items = eval_items(recipe.data.eval, recipe.data)[: recipe.eval.n or None]
        model = load_model(recipe.model, head=objective.head)  # the model class the objective trains
        if run_dir is None:  # everything checked: only now does a new run directory appear
            run_dir = shared_run_dir(recipe, overwrite=overwrite, resume=resume)
            created = main
            lock = lock_of(run_dir) if main else None
        accelerator = make_accelerator(recipe, run_dir)
        if recipe.tracking.tensorboard or recipe.tracking.wandb or recipe.tracking.mlflow:
            accelerator.init_trackers(recipe.name, config={"method": recipe.method.name, "lr": recipe.train.lr,
                                                           "batch_size": recipe.train.batch_size})
        if main:
            atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(asked))
        accelerator.print(f"run directory: {run_dir}")
        accelerator.print(f"precision: {recipe.train.precision} ({why})")
        if need_train and recipe.data.select is not None and prompts is None:  # select first; train on the subset
            from tunelab.selection.run import select_for_recipe

            train_spec = select_for_recipe(recipe, run_dir, accelerator)
            train_data, stats = encode_spec(tokenizer, train_spec, recipe.data)
            check_data_fits(objective, method, train_data, train_spec)
        policy = f"(data.truncation={recipe.data.truncation}, max_length={recipe.data.max_length})"
        if stats is not None:
            accelerator.print(f"train data: {stats.summary()} {policy}")
        if eval_stats is not None and (eval_stats.truncated or eval_stats.dropped_too_long or
                                       eval_stats.dropped_no_target):
            accelerator.print(f"eval data: {eval_stats.summary()} {policy}")
        if prompts is not None:
            accelerator.print(f"train prompts: {len(prompts)} (rollouts of {recipe.rollout.num_generations} each)")
        backend = make_backend(accelerator, recipe)
    except BaseException:
        if created:
            discard_if_unstarted(run_dir)  # removes it and drops the lock
        elif lock is not None:
            lock.release()
        raise
    data_stats = {name: st.as_dict() for name, st in (("train", stats), ("eval", eval_stats)) if st is not None}
    ws = Workspace(recipe, run_dir, accelerator, tokenizer, model, method, objective, train_data, eval_data, items,
                   backend=backend, prompts=prompts, data_stats=data_stats)
    if lock is not None:
        weakref.finalize(ws, lock.release)
    return ws


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
    # the model this run adapts, named: the base, or (`tunelab iterate`) the previous round's merged export
    start = f"the starting model {ws.recipe.model.name_or_path}"
    if use == "model" or (use == "live" and not adapter):
        teacher = getattr(ws.objective.config, "teacher", None)
        if teacher:
            ref_model = load_model(ws.recipe.model.model_copy(update={"name_or_path": teacher, "gguf_file": None,
                                                                     "revision": None}))
            what = f"the teacher {teacher}"
        else:
            ref_model = copy.deepcopy(ws.model)
            what = f"a frozen copy of {start}"
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
            acc.print(f"reference: log-probs of {len(data)} {name} pairs under {start}, cached in the run "
                      "directory")
    elif use != "none":
        acc.print(f"reference: {start} with the adapter disabled")


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
    if ws.prompts is not None:  # on-line RL: the rollout source samples with the policy between steps
        from tunelab.rollouts import build_rollout_source

        source: Any = build_rollout_source(ws.recipe, prompts=ws.prompts, tokenizer=ws.tokenizer,
                                           objective=ws.objective, ref=ws.ref, backend=ws.backend,
                                           run_dir=ws.run_dir if ws.backend.is_main_process else None,
                                           policy=lambda: model)
    else:
        source = StaticBatchSource.from_recipe(ws.recipe, ws.train_data, batch_kind=ws.objective.batch_kind,
                                               pad_id=ws.tokenizer.pad_token_id, backend=ws.backend)
    result = train(ws.recipe, model, ws.method, ws.objective, source, run_dir=ws.run_dir, backend=ws.backend,
                   pad_id=ws.tokenizer.pad_token_id, eval_data=ws.eval_data if ws.prompts is None else None,
                   resume=resume, ref=ws.ref, on_step=on_step)
    return model, result, ws.params
