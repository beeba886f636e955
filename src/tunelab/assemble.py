"""Assemble what a recipe names: the ONE path from a recipe to a model ready to train, evaluate or export.

Layer 5b: it builds on the model and data layers (3), the engine and checkpoints (4), the methods and objectives
(5); evaluation, selection, export (6), the runner and the continual stream (7) and the CLI (8) call it instead of
preparing models themselves:
  * `runner.prepare_workspace` (`tunelab run` / `train`), after the objective's reference is set up;
  * the continual stream (the base once per stream, and the joint upper bound);
  * `restore_run`: `tunelab eval RUN` / `tunelab export RUN` (the same preparation, then a checkpoint's weights);
  * `tunelab methods --count RECIPE`;
  * `prepare_without_data`: selection scorers that tune a model of their own (LESS's LoRA gradients).

`prepare_model` does, in this order (what the method needs is its `capabilities`, never probed):
  1. torch.manual_seed(train.seed), so random initialisations (LoRA's A) are the same in every process and on
     every restore;
  2. the run length (`needs_run_length`: AdaLoRA's budget schedule), from the data size as the loop computes it;
  3. calibration: `needs_calibration` (CorDA, EVA, LoRA-GA) gets the first `n_calibration_batches` SFT batches of
     the training data in file order, padded (not packed); `calibrates_from_examples` (surgical) gets the encoded
     examples and the objective. The same data on every process and on every restore, so a restored CorDA or
     LoRA-GA run rebuilds the residual base W - s B0 A0 that its checkpoint's A, B were trained on;
  4. `method.prepare(model)`; a model with a scalar head (the objective's `head`: a reward model) keeps it
     trainable whatever the method (`tunelab.model.train_head`);
  5. `train.engine.configure_engine` (frozen storage dtype, attention, checkpointing) for training; restoring for
     evaluation or export skips it, so weights stay as loaded (a merged export folds into full precision);
  6. the trainable / total parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data.pipeline import encode_spec
from tunelab.generate.forward import is_prompt_learning
from tunelab.methods.registry import Method, build_method, count_parameters
from tunelab.model import load_model, load_tokenizer, train_head
from tunelab.objectives.base import Objective, build_objective
from tunelab.recipe import DatasetSpec, Recipe, load_recipe

SELECTED_SUBSET = Path("select") / "subset.jsonl"  # where a run with `data.select` keeps its training subset


@dataclass
class Prepared:
    """A model prepared for a recipe, with the method and objective that go with it."""

    model: torch.nn.Module  # after method.prepare (and the engine's switches, when configured)
    method: Method
    objective: Objective
    params: dict[str, float] = field(default_factory=dict)  # trainable_params, total_params, trainable_pct
    engine: dict[str, object] = field(default_factory=dict)  # what configure_engine applied ({}: not configured)

    def describe(self) -> str:
        p = self.params
        return (f"method {self.method.name}: {p['trainable_params']:,} trainable of {p['total_params']:,} parameters "
                f"({p['trainable_pct']:.3f}%)")


def build_method_for(recipe: Recipe) -> Method:
    return build_method(recipe.method.name, recipe.method_options())


def build_objective_for(recipe: Recipe) -> Objective:
    return build_objective(recipe.objective.name, recipe.objective_options())


def needs_training_data(method: Method, recipe: Recipe) -> bool:
    """Whether preparing `method` reads the training data (calibration, or the run length counted in epochs)."""
    caps = method.capabilities
    return caps.needs_calibration or caps.calibrates_from_examples or \
        (caps.needs_run_length and not recipe.train.max_steps)


def run_length(recipe: Recipe, n_examples: int, world_size: int = 1) -> int:
    """The run's optimizer steps, as the training loop counts them."""
    from tunelab.data.batching import StepSampler

    tc = recipe.train
    if tc.max_steps:
        return tc.max_steps
    return StepSampler(n_examples, tc.batch_size, tc.grad_accum, world_size, 0, tc.seed).steps_for_epochs(tc.epochs)


def calibrate(method: Method, model: torch.nn.Module, recipe: Recipe, train_data: list[dict] | None,
              objective: Objective, pad_id: int, world_size: int = 1) -> None:
    """Give a method what its capabilities say it needs before `prepare` (steps 2-3 of the module docstring)."""
    from tunelab.data.batching import COLLATORS

    caps = method.capabilities
    if needs_training_data(method, recipe) and not train_data:
        raise ValueError(f"method {method.name!r} is prepared from the training data (calibration or run length), "
                         f"and none was given")
    if caps.needs_run_length:
        method.total_steps = run_length(recipe, len(train_data or []), world_size)
    if caps.calibrates_from_examples:
        method.calibrate_from_examples(model, train_data, objective, pad_id=pad_id, batch_size=recipe.train.batch_size)
    if caps.needs_calibration:
        if objective.batch_kind != "sft":
            raise ValueError(f"method {method.name!r} calibrates on SFT batches; objective "
                             f"{objective.name!r} has {objective.batch_kind} data")
        bs, n = recipe.train.batch_size, method.n_calibration_batches
        assert train_data is not None
        batches = [COLLATORS["sft"](train_data[i: i + bs], pad_id) for i in range(0, min(len(train_data), n * bs), bs)]
        method.calibrate(model, batches)


def prepare_model(recipe: Recipe, model: torch.nn.Module, method: Method, objective: Objective, *,
                  train_data: list[dict] | None, pad_id: int, device: torch.device | None = None, world_size: int = 1,
                  engine: bool = True, cast_frozen: bool = True) -> Prepared:
    """Seed, calibrate, `method.prepare`, configure the engine (if `engine`), count parameters.

    `train_data`: the encoded training examples (needed when `needs_training_data`); `cast_frozen` is passed to
    configure_engine (the continual stream keeps frozen weights in full precision for non-adapter methods).
    """
    from tunelab.train.engine import configure_engine

    torch.manual_seed(recipe.train.seed)
    calibrate(method, model, recipe, train_data, objective, pad_id, world_size)
    prepared = method.prepare(model)
    layout = "data.padding_free" if recipe.data.padding_free else "data.packing" if recipe.data.packing else None
    # PEFT puts the virtual tokens before each ROW and drops (prompt, P-tuning) or shifts (prefix) position_ids:
    # no restarting positions, so no block-diagonal mask either, and a row's examples would attend to each other
    if layout and is_prompt_learning(prepared):
        raise ValueError(f"{layout}: method {recipe.method.name!r} inserts virtual tokens in front of every row, so "
                         "the examples packed after a row's first would not see them; turn it off for this method")
    if objective.head != "causal_lm":
        train_head(prepared)
    applied: dict[str, object] = {}
    if engine:
        where = device if device is not None else next(prepared.parameters()).device
        applied = configure_engine(prepared, recipe.train, where, cast_frozen=cast_frozen)
    trainable, total = count_parameters(prepared)
    params = {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total}
    return Prepared(prepared, method, objective, params, applied)


def training_spec(recipe: Recipe, run_dir: str | Path | None = None) -> DatasetSpec:
    """The training data a run in `run_dir` read: with `data.select`, the subset selected into the run directory
    (`selection.run.select_for_recipe` writes it). Without a run directory: the recipe's `data.train`."""
    if recipe.data.select is None or run_dir is None:
        return recipe.data.train
    subset = Path(run_dir) / SELECTED_SUBSET
    if not subset.is_file():
        raise FileNotFoundError(f"{run_dir}: the recipe selects its training data (data.select), and the subset "
                                f"{subset} is missing")
    return DatasetSpec(path=str(subset), format=recipe.data.train.format)


def assemble(recipe: Recipe, *, run_dir: str | Path | None = None, tokenizer=None,
             engine: bool = False) -> tuple[Prepared, Any]:
    """Load the recipe's model and tokenizer, build its method and objective, prepare (see the module docstring).

    The training data is read only when the method's preparation needs it; with `data.select` it is the subset in
    `run_dir`. Returns (prepared, tokenizer).
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model)
    method, objective = build_method_for(recipe), build_objective_for(recipe)
    train_data = None
    if needs_training_data(method, recipe):
        train_data, _ = encode_spec(tokenizer, training_spec(recipe, run_dir), recipe.data)
    # on the CPU, as the runner calibrates and prepares (the loop moves the model to the device afterwards)
    prepared = prepare_model(recipe, load_model(recipe.model, head=objective.head), method, objective,
                             train_data=train_data, pad_id=tokenizer.pad_token_id, engine=engine)
    return prepared, tokenizer


@dataclass
class Restored:
    """A run's trained model: the recipe's preparation plus a checkpoint's weights and method state."""

    recipe: Recipe
    prepared: Prepared
    tokenizer: Any
    checkpoint: Path

    @property
    def model(self) -> torch.nn.Module:
        return self.prepared.model

    @property
    def method(self) -> Method:
        return self.prepared.method


def restore_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Restored:
    """The model a run trained, from its latest checkpoint or `checkpoint` (a `<run>/checkpoints/step-N` dir).

    Prepared exactly as the run prepared it (calibration included, without the engine's switches), then the
    checkpoint's trainable tensors and method state are loaded.
    """
    from tunelab.train.checkpoint import latest_checkpoint
    from tunelab.train.restore import read_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to restore (train first, or check the path)")
    ckpt = read_checkpoint(path)  # first: a damaged checkpoint is named before any model work
    prepared, tokenizer = assemble(recipe, run_dir=run_dir, engine=False)
    prepared.method.load_trainable_state_dict(prepared.model, ckpt["trainable"])
    prepared.method.load_state_dict(ckpt["state"].get("method", {}))
    return Restored(recipe, prepared, tokenizer, path)


def prepare_without_data(model: torch.nn.Module, method_name: str, options: dict[str, Any]) -> tuple[Method, Any]:
    """A model with a method applied that needs no training data (no calibration, no run length): what selection
    scorers use to tune a model of their own (LESS: LoRA gradients). Returns (method, prepared model)."""
    method = build_method(method_name, options)
    caps = method.capabilities
    if caps.needs_calibration or caps.calibrates_from_examples or caps.needs_run_length:
        raise ValueError(f"method {method_name!r} is prepared from training data; use prepare_model with a recipe")
    return method, method.prepare(model)

