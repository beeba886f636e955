"""What the training loop needs of a method and of an objective, as Protocols.

`train/` sits below `methods/` and `objectives/` (layer 4 under layer 5), so the loop is typed with these
structural interfaces instead of importing the plug-ins' base classes: `methods.registry.Method` and
`objectives.base.Objective` satisfy them, and so does any test double with the same members.

The small value types the loop and the plug-ins exchange live here too: `ObjectiveOutput` (an objective's
answer for one micro-batch; re-exported by `tunelab.objectives.base`) and `StepResult` (one optimizer
step's loss and counts, from `forward_backward` or a method's `custom_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # scalar: SUM of the loss over this micro-batch's units
    n_units: torch.Tensor  # scalar: number of units (target tokens, or examples/pairs)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # SUMS over units; the loop divides by n_units


@dataclass
class StepResult:
    """One optimizer step's accumulation, as the loop logs it.

    loss_sum     this process's loss SUM over its micro-batches (the loop all-reduces it)
    metric_sums  this process's metric SUMS over its micro-batches (all-reduced likewise)
    global_units loss units (target tokens or examples) of the whole global batch, all processes
    global_tokens attended tokens of the whole global batch (throughput)
    The logged loss is sum over processes of loss_sum / global_units: the global token (or example) mean.
    """

    loss_sum: float
    metric_sums: dict[str, float]
    global_units: float
    global_tokens: float


@runtime_checkable
class TrainObjective(Protocol):
    """What the loop asks of an objective (`tunelab.objectives.base.Objective`)."""

    unit: str  # "token" | "example": what `loss_sum` is a sum over
    batch_kind: str  # "sft" | "preference": which collator builds its batches

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ref: Any = None) -> ObjectiveOutput:
        ...


class StepCapabilities(Protocol):
    """What the loop reads of a method's declared capabilities (`methods.registry.Capabilities`)."""

    @property
    def custom_step(self) -> bool: ...  # custom_step() replaces backward + optimizer step (MeZO)

    @property
    def eager_by_default(self) -> bool: ...  # `train.compile: auto` leaves the layers eager


@runtime_checkable
class TrainMethod(Protocol):
    """What the loop asks of a method (`tunelab.methods.registry.Method`; its docstring says when each runs)."""

    @property
    def capabilities(self) -> StepCapabilities: ...  # declared as data; the loop never probes

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]: ...

    def build_optimizer(self, model: torch.nn.Module, train_config: Any) -> torch.optim.Optimizer | None: ...

    def on_train_start(self, model: torch.nn.Module, total_steps: int) -> None: ...

    def after_backward(self, model: torch.nn.Module, step: int) -> None: ...

    def on_step_end(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None: ...

    def custom_step(self, *, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], objective: TrainObjective,
                    optimizer: torch.optim.Optimizer, lr: float, step: int, ref: Any,
                    backend: Any) -> StepResult: ...  # called only with capabilities.custom_step; backend: a Backend

    def trainable_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
