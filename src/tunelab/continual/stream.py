"""`run_continual`: a stream of tasks, one training stage per task through the one training loop, every task
and the general-ability files evaluated before training and after every stage.

  1. everything is loaded and checked first: every stage's train and eval data, the general files, the
     strategies against the method; the first problem stops the stream before any training, naming it;
  2. the base model is evaluated (row b of the R matrix), the method prepares it once for the whole stream;
  3. stage s: strategies' prepare_stage / stage_data / before_stage, `tunelab.train.loop.train` with the
     run's objective wrapped in StrategyObjective (their loss terms) and their on_step hook, after_stage,
     evaluation of every task (row R[s]) and general ability, then the stage's state is saved;
  4. after the last stage: the strategies' finish, the export, and (with `joint: true`) the multi-task upper
     bound trained from the base on all stages' data at once.

Run directory:
  continual.yaml, recipe.yaml          the continual recipe, and its base recipe (what `tunelab report` reads)
  continual/before.json                the base model's scores (b) and general ability
  continual/stage-NN-<task>/           the stage's training run (metrics.jsonl) and its eval.json
  continual/model-stage-NN/            state after stage NN: the changed weights + each strategy's state
  continual/state.json                 stages completed and what each cost
  continual/r_matrix.json              tasks, b, R, joint, general ability per stage, every metric
  continual/joint/                     the joint run and its eval.json (joint: true)
  metrics.jsonl                        every stage's training metrics, steps numbered across the stream
  export/, summary.json                the final model, and the summary
Resume (`--resume`): the stream restarts at the first stage not completed, from the start of that stage
(the model and strategy state saved after the previous stage); completed stages' results are not touched.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.assemble import Prepared, build_method_for, build_objective_for, prepare_model
from tunelab.continual.evaluation import ContinualError, evaluate_model, load_general, load_tasks
from tunelab.continual.recipe import ContinualRecipe, continual_recipe_to_yaml
from tunelab.continual.strategies.base import StrategyError, StrategyObjective, StreamContext, build_strategy
from tunelab.core.io import atomic_dir, atomic_write_json, atomic_write_text
from tunelab.core.rundir import lock_run_dir, new_run_dir
from tunelab.evaluate.forgetting import general_retention, r_matrix_metrics
from tunelab.model import load_model, load_tokenizer
from tunelab.recipe import recipe_to_yaml
from tunelab.runner import make_accelerator, resolve_run_precision
from tunelab.train.backends import build_backend
from tunelab.train.loop import train
from tunelab.train.precision import restore_frozen_weights
from tunelab.train.sources import StaticBatchSource

log = logging.getLogger("tunelab")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


class Stream:
    """The state of one continual run; `run()` does the whole of it."""

    def __init__(self, cr: ContinualRecipe, run_dir: Path, *, resume: bool, progress: bool = True):
        self.cr, self.run_dir, self.resume, self.progress = cr, run_dir, resume, progress
        self.cdir = run_dir / "continual"
        self.cdir.mkdir(parents=True, exist_ok=True)
        self.state = _read_json(self.cdir / "state.json") if resume else None
        self.state = self.state or {"completed": 0, "stages": [], "joint": None, "exports": None}

    # -- loading ---------------------------------------------------------------------------------------
    def load(self) -> None:
        asked = self.cr  # saved as written (`precision: auto` stays auto); the stream uses the resolved copy
        base, why = resolve_run_precision(asked.base)
        self.cr = cr = asked.model_copy(update={"base": base})
        self.accelerator = make_accelerator(cr.base, self.run_dir)
        self.accelerator.print(f"precision: {base.train.precision} ({why})")
        self.backend = build_backend(cr.base, self.accelerator)
        if self.backend.sharded:  # every stage trains the same model again: it would be sharded once per stage
            raise ContinualError(f"tunelab continual trains with distributed.backend=ddp (one process); "
                                 f"{cr.base.distributed.backend!r} is for `tunelab run` / `train`")
        if self.accelerator.num_processes > 1:
            raise ContinualError("tunelab continual runs in one process for now (multi-process stages are not "
                                 "implemented); launch it without torchrun / accelerate launch")
        atomic_write_text(self.run_dir / "continual.yaml", continual_recipe_to_yaml(asked))
        atomic_write_text(self.run_dir / "recipe.yaml", recipe_to_yaml(asked.base))
        self.tokenizer = load_tokenizer(cr.base.model)
        self.tasks = load_tasks(cr, self.tokenizer)  # every stage's data, before any training
        self.general = load_general(cr)
        self.strategies = [build_strategy(s.name, s.options()) for s in cr.strategy]
        self.method, self.objective = build_method_for(cr.base), build_objective_for(cr.base)
        self.ctx = StreamContext(recipe=cr, task_names=cr.task_names, train_data=[t.train for t in self.tasks],
                                 objective=self.objective, method=self.method, tokenizer=self.tokenizer,
                                 device=self.accelerator.device, precision=cr.base.train.precision,
                                 pad_id=self.tokenizer.pad_token_id, run_dir=self.run_dir)
        for s in self.strategies:
            try:
                s.check(self.ctx)
            except StrategyError as e:
                raise ContinualError(str(e)) from None

    def _evaluate(self, model) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            for s in self.strategies:
                stack.enter_context(s.eval_weights(model))
            return evaluate_model(model, self.tokenizer, self.tasks, self.general, self.cr, objective=self.objective,
                                  device=self.accelerator.device, progress=self.progress)

    def prepare_model(self, recipe, method, calibration_data: list[dict], evaluate_before: bool = False) -> Prepared:
        """Load the base, (evaluate it,) and prepare it for `recipe` (its seed, run length, calibration) through
        `tunelab.assemble.prepare_model`."""
        cr = self.cr
        model = load_model(cr.base.model, head=self.objective.head).to(self.accelerator.device)
        if evaluate_before:
            print("evaluating the base model on every task ...")
            before = evaluate_model(model, self.tokenizer, self.tasks, self.general, cr, objective=self.objective,
                                    device=self.accelerator.device, progress=self.progress)
            atomic_write_json(self.cdir / "before.json", before)
        # the engine's switches as in `tunelab run`; frozen base weights go to the compute dtype only under an
        # adapter: a method that trains the weights themselves keeps them in full precision, since a later
        # stage may train what is frozen now (HFT)
        return prepare_model(recipe, model, method, self.objective, train_data=calibration_data,
                             pad_id=self.tokenizer.pad_token_id, device=self.accelerator.device,
                             cast_frozen=method.capabilities.is_adapter)

    def _source(self, recipe, data: list[dict], objective) -> StaticBatchSource:
        return StaticBatchSource.from_recipe(recipe, data, batch_kind=objective.batch_kind,
                                             pad_id=self.tokenizer.pad_token_id, backend=self.backend)

    # -- stage state (resume) ----------------------------------------------------------------------------
    def _model_dir(self, k: int) -> Path:
        return self.cdir / f"model-stage-{k:02d}"

    def _state_names(self, model) -> set[str]:
        names = set(self.method.trainable_state_dict(model))
        for s in self.strategies:
            names |= s.extra_state_names(model)
        return names

    def save_stage_state(self, model, k: int) -> None:
        """Atomically write the weights that changed and every strategy's state after stage k (1-based)."""
        from safetensors.torch import save_file

        names = self._state_names(model)
        with atomic_dir(self._model_dir(k)) as tmp:
            save_file({n: p.detach().contiguous().clone() for n, p in model.named_parameters() if n in names},
                      str(tmp / "weights.safetensors"))
            for i, s in enumerate(self.strategies):
                tensors, meta = s.state()
                if tensors:
                    save_file({n: t.detach().contiguous().clone() for n, t in tensors.items()},
                              str(tmp / f"strategy-{i}.safetensors"))
                atomic_write_json(tmp / f"strategy-{i}.json", meta)
            atomic_write_json(tmp / "method.json", self.method.state_dict())

    def load_stage_state(self, model, k: int) -> None:
        from safetensors.torch import load_file

        d = self._model_dir(k)
        if not (d / "weights.safetensors").is_file():
            raise ContinualError(f"--resume: {d} is missing; cannot continue after stage {k}")
        params = dict(model.named_parameters())
        weights = load_file(str(d / "weights.safetensors"))
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise ContinualError(f"--resume: {d} holds weights the model lacks: {unknown[:3]}")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        self.method.load_state_dict(_read_json(d / "method.json", {}))
        for i, s in enumerate(self.strategies):
            f = d / f"strategy-{i}.safetensors"
            s.load_state(load_file(str(f)) if f.is_file() else {}, _read_json(d / f"strategy-{i}.json", {}), model)

    # -- the stream ---------------------------------------------------------------------------------------
    def run_stage(self, model, i: int):
        cr, name = self.cr, self.tasks[i].name
        sdir = self.cdir / f"stage-{i + 1:02d}-{_safe(name)}"
        if sdir.exists():  # a stage interrupted earlier restarts from its beginning
            shutil.rmtree(sdir)
        sdir.mkdir(parents=True)
        recipe = cr.stage_recipe(i)
        torch.manual_seed(recipe.train.seed + i)
        for s in self.strategies:
            model = s.prepare_stage(self.ctx, model, i)
        data = self.tasks[i].train
        for s in self.strategies:
            data = s.stage_data(self.ctx, i, data)
        for s in self.strategies:
            s.before_stage(self.ctx, model, i)
        objective = StrategyObjective(self.objective, self.strategies) if self.strategies else self.objective
        print(f"\nstage {i + 1}/{len(self.tasks)}: {name} ({len(data)} training examples"
              f"{', strategies ' + ', '.join(s.name for s in self.strategies) if self.strategies else ''})")

        def on_step(step: int, loss: float) -> None:
            for s in self.strategies:
                s.on_step(model, step)

        result = train(recipe, model, self.method, objective, self._source(recipe, data, objective), run_dir=sdir,
                       backend=self.backend, pad_id=self.tokenizer.pad_token_id, eval_data=self.tasks[i].eval_encoded,
                       on_step=on_step, progress=self.progress)
        self.accelerator.free_memory()  # drop the accelerator's references to this stage's optimizer
        t0 = time.perf_counter()
        for s in self.strategies:
            s.after_stage(self.ctx, model, i)
        strategy_time = time.perf_counter() - t0
        print(f"evaluating every task after stage {i + 1} ...")
        ev = self._evaluate(model)
        info = {"stage": i + 1, "task": name, "examples": len(data), "steps": result.steps,
                "final_loss": result.final_loss, "train_time_s": result.wall_time_s,
                "strategy_time_s": strategy_time, "tokens_per_s": result.tokens_per_s,
                "peak_memory_mb": result.peak_memory_mb, "eval_time_s": ev["eval_time_s"]}
        atomic_write_json(sdir / "eval.json", {**info, **ev})
        self.save_stage_state(model, i + 1)
        self._append_metrics(sdir, i)
        self.state["stages"] = [*self.state["stages"][:i], info]
        self.state["completed"] = i + 1
        atomic_write_json(self.cdir / "state.json", self.state)
        if not cr.keep_checkpoints:
            shutil.rmtree(sdir / "checkpoints", ignore_errors=True)
        if i > 0:
            shutil.rmtree(self._model_dir(i), ignore_errors=True)
        self.write_r_matrix()
        return model

    def _append_metrics(self, sdir: Path, i: int) -> None:
        offset = sum(s["steps"] for s in self.state["stages"][:i])
        lines = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
            if (sdir / "metrics.jsonl").is_file() else []
        path = self.run_dir / "metrics.jsonl"
        kept = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        kept = [m for m in kept if m.get("stage", 0) <= i]  # a stage re-run after a crash replaces its lines
        kept += [{**m, "stage": i + 1, "task": self.tasks[i].name, "stage_step": m["step"], "step": offset + m["step"]}
                 for m in lines]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))

    def _stage_evals(self) -> list[dict]:
        out = []
        for i in range(self.state["completed"]):
            p = self.cdir / f"stage-{i + 1:02d}-{_safe(self.cr.task_names[i])}" / "eval.json"
            out.append(_read_json(p, {}))
        return out

    def write_r_matrix(self) -> dict[str, Any]:
        names = self.cr.task_names
        before = _read_json(self.cdir / "before.json")
        evals = self._stage_evals()
        rm: dict[str, Any] = {
            "tasks": names, "metric": "exact_match",
            "b": [before["scores"].get(t) for t in names] if before else None,
            "R": [[ev.get("scores", {}).get(t) for t in names] for ev in evals],
            "joint": [self.state["joint"]["scores"].get(t) for t in names] if self.state.get("joint") else None,
            "general": {"before": (before or {}).get("general", {}), "stages": [ev.get("general", {}) for ev in evals]},
        }
        rm["metrics"] = r_matrix_metrics(rm)
        if before and evals:
            rm["metrics"]["general_retention"] = general_retention(before.get("general", {}),
                                                                   evals[-1].get("general", {}))
        atomic_write_json(self.cdir / "r_matrix.json", rm)
        return rm

    def run_joint(self) -> dict[str, Any]:
        """The multi-task upper bound: the same method from the base, on every stage's data at once, for the
        stages' steps summed (or the same epochs over the union)."""
        from tunelab.data.batching import StepSampler

        cr = self.cr
        steps = []
        for i, t in enumerate(self.tasks):
            tc = cr.stage_recipe(i).train
            steps.append(tc.max_steps or StepSampler(len(t.train), tc.batch_size, tc.grad_accum, 1, 0,
                                                     tc.seed).steps_for_epochs(tc.epochs))
        union = [ex for t in self.tasks for ex in t.train]
        recipe = cr.stage_recipe(0).model_copy(update={"name": f"{cr.name}/joint"})
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": sum(steps)})})
        prepared = self.prepare_model(recipe, build_method_for(cr.base), union)  # AdaLoRA: the joint run's length
        model, method = prepared.model, prepared.method
        jdir = self.cdir / "joint"
        shutil.rmtree(jdir, ignore_errors=True)
        jdir.mkdir()
        print(f"\njoint upper bound: {len(union)} examples of {len(self.tasks)} tasks, {sum(steps)} steps")
        result = train(recipe, model, method, self.objective, self._source(recipe, union, self.objective), run_dir=jdir,
                       backend=self.backend, pad_id=self.tokenizer.pad_token_id, progress=self.progress)
        self.accelerator.free_memory()
        ev = evaluate_model(model, self.tokenizer, self.tasks, self.general, cr, objective=self.objective,
                            device=self.accelerator.device, progress=self.progress)
        out = {"steps": result.steps, "train_time_s": result.wall_time_s, "final_loss": result.final_loss, **ev}
        atomic_write_json(jdir / "eval.json", out)
        if not cr.keep_checkpoints:
            shutil.rmtree(jdir / "checkpoints", ignore_errors=True)
        return {k: v for k, v in out.items() if k != "samples"}

    def run(self) -> dict[str, Any]:
        from tunelab.export import export_all

        cr, t_start = self.cr, time.perf_counter()
        self.load()
        need_before = cr.base.eval.before and not (self.resume and (self.cdir / "before.json").is_file())
        prepared = self.prepare_model(cr.stage_recipe(0), self.method, self.tasks[0].train, evaluate_before=need_before)
        model = prepared.model
        trainable, total = int(prepared.params["trainable_params"]), int(prepared.params["total_params"])
        print(prepared.describe())
        for s in self.strategies:
            s.setup(self.ctx, model)
        done = self.state["completed"]
        if done:
            print(f"resuming after stage {done} of {len(self.tasks)}")
            for i in range(done):  # rebuild the structure the completed stages had (O-LoRA's adapters)
                torch.manual_seed(cr.base.train.seed + i)
                for s in self.strategies:
                    model = s.prepare_stage(self.ctx, model, i)
            self.load_stage_state(model, done)
        for i in range(done, len(self.tasks)):
            model = self.run_stage(model, i)
        for s in self.strategies:
            s.finish(self.ctx, model)
        if self.state.get("exports") is None and (cr.base.export.adapter or cr.base.export.merged):
            print("exporting the final model ...")
            if cr.base.export.merged and self.method.capabilities.is_adapter:
                restore_frozen_weights(model, load_model(cr.base.model, head=self.objective.head).state_dict())
            self.state["exports"] = export_all(self.method, model, self.tokenizer, self.run_dir / "export",
                                               adapter=cr.base.export.adapter, merged=cr.base.export.merged)
            atomic_write_json(self.cdir / "state.json", self.state)
        del model
        self.accelerator.free_memory()
        gc.collect()
        if cr.joint and not self.state.get("joint"):
            self.state["joint"] = self.run_joint()
            atomic_write_json(self.cdir / "state.json", self.state)
        rm = self.write_r_matrix()
        summary = self.summary(rm, trainable, total, time.perf_counter() - t_start)
        atomic_write_json(self.run_dir / "summary.json", summary)
        print()
        print(format_stream(rm))
        print(f"\nrun directory: {self.run_dir}")
        self.accelerator.end_training()
        return summary

    def summary(self, rm: dict[str, Any], trainable: int, total: int, wall: float) -> dict[str, Any]:
        stages = self.state["stages"]
        return {
            "run_dir": str(self.run_dir), "kind": "continual", "method": self.cr.base.method.name,
            "objective": self.cr.base.objective.name, "strategies": [s.name for s in self.cr.strategy],
            "tasks": self.cr.task_names, "trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / total, "stages": stages,
            "train_time_s": sum(s["train_time_s"] + s["strategy_time_s"] for s in stages),
            "eval_time_s": sum(s["eval_time_s"] for s in stages),
            "peak_memory_mb": max((s["peak_memory_mb"] for s in stages), default=None),
            "tokens_per_s": sum(s["tokens_per_s"] for s in stages) / max(len(stages), 1),
            "metrics": rm["metrics"], "joint": self.state.get("joint"), "exports": self.state.get("exports"),
            "wall_time_s": wall,
        }


def run_continual(cr: ContinualRecipe, *, run_dir: Path | None = None, overwrite: bool = False, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or with `resume`, continue) a continual recipe; returns the summary also saved as summary.json.

    The run directory's lock is taken before any work, as `tunelab run RUN --resume` takes it: by `new_run_dir`
    for a new (or `resume`d by name) directory, here for a given `run_dir` (`tunelab continual RUN`), so a second
    writer is refused (RunLocked, naming the holder's pid and host)."""
    if run_dir is None:
        run_dir = new_run_dir(cr.output_dir, cr.name, overwrite=overwrite, resume=resume)
        return Stream(cr, Path(run_dir), resume=resume, progress=progress).run()
    lock = lock_run_dir(run_dir)
    try:
        return Stream(cr, Path(run_dir), resume=resume, progress=progress).run()
    finally:
        lock.release()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f} pts"


def format_stream(rm: dict[str, Any]) -> str:
    """The R matrix (rows: before, after each stage, joint) and the metrics, as a text table."""
    names = rm["tasks"]
    first = max([len("after 00 ") + max(len(n) for n in names), len("before"), 6])
    width = max(8, *(len(n) for n in names))
    lines = ["R matrix: exact match on each task (columns) after each stage (rows)",
             f"{'':<{first}}  " + "  ".join(f"{n:>{width}}" for n in names)]

    def row(label: str, values) -> str:
        return f"{label:<{first}}  " + "  ".join(f"{_pct(v):>{width}}" for v in values)

    if rm.get("b"):
        lines.append(row("before", rm["b"]))
    for i, r in enumerate(rm["R"]):
        lines.append(row(f"after {i + 1:02d} {names[i]}", r))
    if rm.get("joint"):
        lines.append(row("joint (upper bound)", rm["joint"]))
    m = rm["metrics"]
    lines.append("")
    lines.append(f"ACC {_pct(m.get('ACC'))}   BWT {_signed(m.get('BWT'))} (/T: {_signed(m.get('BWT_T'))})   "
                 f"FWT {_signed(m.get('FWT'))} (/T: {_signed(m.get('FWT_T'))})   forgetting "
                 f"{_signed(m.get('forgetting'))} (max-based {_signed(m.get('forgetting_max'))})"
                 + (f"   joint ACC {_pct(m['joint_ACC'])}" if m.get("joint_ACC") is not None else ""))
    for name, g in (m.get("general_retention") or {}).items():
        lines.append(f"general {name}: {g['metric']} {g['before']:.4g} -> {g['after']:.4g}"
                     + (f" (retained {100 * g['retained']:.1f}%)" if g.get("retained") is not None else ""))
    return "\n".join(lines)
