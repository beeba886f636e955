"""The Strategy interface of continual fine-tuning, its registry, and the objective wrapper that adds the
strategies' loss terms to the run's objective.

A strategy is a small class with a typed `Config`, registered under a name with its paper:

    @register_strategy("ewc", paper="https://arxiv.org/abs/1612.00796")
    class EWC(Strategy):
        class Config(StrategyOptions):
            weight: float = 1000.0
        def loss_terms(self, model, batch): ...

The stream (`tunelab.continual.stream`) calls, for stage s = 0..T-1:
  check(ctx)                       once, before anything is loaded or trained: refuse what cannot work
  setup(ctx, model)                once, on the prepared model before any training (also on resume)
  prepare_stage(ctx, model, s)     structural change at the start of stage s (O-LoRA: a new adapter);
                                   replayed for completed stages when a stream resumes -> the model
  stage_data(ctx, s, data)         the stage's training examples (replay mixes the buffer in)
  before_stage(ctx, model, s)      anchors, teachers
  loss_terms(model, batch)         extra loss terms of one training micro-batch (see StrategyObjective)
  on_step(model, step)             after every optimizer step (I-LoRA's EMA)
  after_stage(ctx, model, s)       after training stage s, before it is evaluated (Fisher, buffer, LiNeS)
  eval_weights(model)              context in which the model is evaluated and exported (I-LoRA: slow weights)
  finish(ctx, model)               after the last stage, before export
  state() / load_state(...)        what a stream must save after a stage to resume at the next one
  extra_state_names(model)         parameters that changed but are no longer trainable (O-LoRA's old adapters)
Every module of this package not starting with `_` (and not `base`) is imported by the registry, so a new
strategy is one new file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from tunelab.core.registry import Registry
from tunelab.core.unwrap import unwrap_model
from tunelab.objectives.base import Objective, ObjectiveOutput


class StrategyOptions(BaseModel):
    """Base for strategy configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class StrategyError(ValueError):
    """A strategy that cannot work with this recipe (checked before any training)."""


@dataclass
class StreamContext:
    """What strategies may read about the stream (filled by tunelab.continual.stream)."""

    recipe: Any  # ContinualRecipe
    task_names: list[str]
    train_data: list[list[dict]]  # encoded training examples of each stage, before any mixing
    objective: Objective  # the run's own objective (without strategy terms)
    method: Any  # the Method
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    pad_id: int = 0
    run_dir: Path | None = None

    @property
    def n_stages(self) -> int:
        return len(self.task_names)


class Strategy:
    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = StrategyOptions

    def __init__(self, config: BaseModel | None = None):
        self.config = config if config is not None else self.Config()

    # -- hooks (all optional) ----------------------------------------------------------------------
    def check(self, ctx: StreamContext) -> None:
        pass

    def setup(self, ctx: StreamContext, model: torch.nn.Module) -> None:
        pass

    def prepare_stage(self, ctx: StreamContext, model: torch.nn.Module, stage: int) -> torch.nn.Module:
        return model

    def stage_data(self, ctx: StreamContext, stage: int, data: list[dict]) -> list[dict]:
        return data

    def before_stage(self, ctx: StreamContext, model: torch.nn.Module, stage: int) -> None:
        pass

    def loss_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar terms ADDED TO THE PER-UNIT MEAN LOSS of the step (see StrategyObjective)."""
        return {}

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def after_stage(self, ctx: StreamContext, model: torch.nn.Module, stage: int) -> None:
        pass

    @contextlib.contextmanager
    def eval_weights(self, model: torch.nn.Module) -> Iterator[None]:
        yield

    def finish(self, ctx: StreamContext, model: torch.nn.Module) -> None:
        pass

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) to save after a stage."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module) -> None:
        pass

    def extra_state_names(self, model: torch.nn.Module) -> set[str]:
        return set()


_STRATEGIES: Registry = Registry("strategy", package="tunelab.continual.strategies", skip=("base",))


def register_strategy(name: str, paper: str | None = None):
    """Class decorator registering a Strategy under `name`."""
    return _STRATEGIES.register(name, paper)


def get_strategy_class(name: str) -> type[Strategy]:
    return _STRATEGIES.get(name)


def list_strategies() -> dict[str, type[Strategy]]:
    return _STRATEGIES.sorted()


def build_strategy(name: str, options: dict[str, Any]) -> Strategy:
    cls = get_strategy_class(name)
    return cls(cls.Config.model_validate(options))


class StrategyObjective(Objective):
    """The run's objective plus the strategies' loss terms: how strategies reach the one training loop.

    The loop normalises loss SUMS by the number of loss units of the whole optimizer step (all micro-batches,
    all processes). A strategy term c is meant per unit, like the mean loss: the step's loss is
    mean_units(loss) + c. So each micro-batch adds c * n_units to its loss sum; summed over the step and
    divided by the step's units that is exactly c (for a per-step penalty such as EWC), or the unit-weighted
    mean of c over the micro-batches (for a data-dependent term such as LwF's KL or GeRe's replay loss).
    Gradient accumulation and multiple processes therefore change nothing, as for the objective itself.
    Terms are added in training only (`model.training`): held-out losses stay the objective's own. Each term
    is logged in metrics.jsonl as `<strategy>/<term>` (per unit, i.e. c itself).
    """

    def __init__(self, inner: Objective, strategies: list[Strategy]):
        super().__init__(inner.config)
        self.inner, self.strategies = inner, strategies
        self.name, self.paper = inner.name, inner.paper
        self.unit, self.batch_kind = inner.unit, inner.batch_kind

    def reference_use(self) -> str:
        """What the wrapped objective needs of a reference model (strategies need none of it)."""
        use = getattr(self.inner, "reference_use", None)
        return use() if use is not None else "none"

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        out = self.inner.compute(model, batch, ref)
        if not model.training or not self.strategies:
            return out
        loss_sum, metrics = out.loss_sum, dict(out.metrics)
        n = torch.as_tensor(out.n_units, dtype=torch.float32, device=loss_sum.device)
        for s in self.strategies:
            for key, term in s.loss_terms(model, batch).items():
                loss_sum = loss_sum + term.to(loss_sum.dtype) * n
                metrics[f"{s.name}/{key}"] = term.detach().float() * n
        return ObjectiveOutput(loss_sum=loss_sum, n_units=out.n_units, metrics=metrics)


# -- helpers shared by strategies -------------------------------------------------------------------


unwrap = unwrap_model  # the model under DDP-style wrappers (core.unwrap's), as the strategies call it


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (names as the unwrapped model gives them)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """fp32 copies of parameter values (anchors: EWC's theta*, L2's previous weights, I-LoRA's slow weights)."""
    return {n: p.detach().float().clone() for n, p in params.items()}


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "disable_adapter") and hasattr(unwrap(model), "peft_config")
