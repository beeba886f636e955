"""The Objective interface: what is minimised, separate from which parameters move.

An objective turns a micro-batch into a loss SUM and a count of the units that sum runs over
(target tokens for SFT, examples or pairs for preference losses). The training loop, not the
objective, divides by the total number of units of all micro-batches accumulated into one
optimizer step on all processes: that is what makes gradient accumulation and multi-process
training give the same gradient as one big batch (see `tunelab.train.loop`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from tunelab.core.registry import Registry
from tunelab.train.interfaces import ObjectiveOutput  # noqa: F401 - defined with the loop's interfaces; imported from here too


class ObjectiveOptions(BaseModel):
    """Base for objective configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Objective:
    """Subclass, set `Config` and `unit`, implement `compute`, decorate with `@register_objective`."""

    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = ObjectiveOptions
    unit: ClassVar[str] = "token"  # "token" | "example"
    batch_kind: ClassVar[str] = "sft"  # which collator feeds it: "sft" | "preference"
    # the model class it trains (tunelab.model.HEADS): the vocabulary head, or a scalar sequence-classification
    # head (a reward model); the runner and `assemble` load the model with it
    head: ClassVar[str] = "causal_lm"

    def __init__(self, config: BaseModel | None = None, **context: Any):
        self.config = config if config is not None else self.Config()
        self.context = context

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ref: Any = None) -> ObjectiveOutput:
        raise NotImplementedError

    def reference_use(self) -> str:
        """What the objective needs of a reference model (the runner sets it up; docs/objectives.md, References):

        "none"   no reference (plain SFT, SimPO, ORPO);
        "logps"  summed response log-probs of the training pairs only (DPO): the adapter-disabled base under an
                 adapter method, else precomputed once (`reference_cache`);
        "live"   a model run during training on sequences not known in advance (KTO, the SFT KL anchor): the
                 adapter-disabled base under an adapter method, else a frozen copy;
        "model"  a separate model even under an adapter (distillation's teacher).
        """
        return "none"


_OBJECTIVES: Registry = Registry("objective", package="tunelab.objectives", skip=("base",))


def register_objective(name: str, paper: str | None = None):
    """Class decorator: `@register_objective("dpo", paper="https://arxiv.org/abs/2305.18290")`."""
    return _OBJECTIVES.register(name, paper)


def get_objective_class(name: str) -> type[Objective]:
    return _OBJECTIVES.get(name)


def list_objectives() -> dict[str, type[Objective]]:
    return _OBJECTIVES.sorted()


def build_objective(name: str, options: dict[str, Any], **context: Any) -> Objective:
    cls = get_objective_class(name)
    return cls(cls.Config.model_validate(options), **context)
