"""The Method interface and registry: which parameters train, and how.

A method is a small class with a typed `Config`, registered under a name with its paper:

    @register("lora", paper="https://arxiv.org/abs/2106.09685")
    class LoRA(Method):
        class Config(MethodOptions):
            r: int = 16
        def prepare(self, model): ...

What the method needs from whoever prepares it is DATA, its `capabilities` (a `Capabilities`), read by
`tunelab.assemble` (and the runner, the continual stream, the loop) instead of probing for attributes:
  needs_calibration        -> calibrate(model, batches) with the first SFT batches before prepare (CorDA, EVA,
                              LoRA-GA; `n_calibration_batches` of them)
  calibrates_from_examples -> calibrate_from_examples(model, examples, objective, ...) before prepare (surgical)
  needs_run_length         -> `total_steps` (the run's optimizer steps) set before prepare (AdaLoRA's schedule)
  is_adapter               -> the prepared model is a PEFT wrapper around a frozen base (a reference model is the
                              base with the adapter disabled; frozen weights may be stored in the compute dtype)
  supports_sharding        -> the method has been checked under sharded training (FSDP2 / ZeRO-3)
  custom_step              -> custom_step() replaces backward + optimizer step (MeZO)

The training loop talks to this interface:
  prepare(model)           -> the model to train (frozen / wrapped as the method needs)
  param_groups(model, wd)  -> optimizer parameter groups (e.g. LoRA+ gives B a larger lr)
  build_optimizer(...)     -> an optimizer of its own (GaLore's projected AdamW, GMT's masked AdamW); None =
                              train.optimizer over param_groups
  on_train_start(model, n) -> once, knowing the number of steps (COLA's restart schedule)
  after_backward(model, k) -> with gradients in place, before clipping/update (AdaLoRA's rank allocation)
  on_step_end(...)         -> per-step hook (LISA re-sampling, COLA restarts, SpIEL prune/regrow)
  custom_step(...)         -> an update rule of its own (MeZO: no backward); called instead of backward +
                              optimizer step when `capabilities.custom_step` says so
  merged_model(model)      -> a plain HF model with the method folded into the weights
  save_adapter(model, dir) -> the method's adapter (PEFT format, or tunelab's own), or raise ExportUnsupported
  state_dict()/load_state_dict() -> method state that a checkpoint must carry (masks, seeds, ...)
Adding a method is one new file in this package: the registry imports (and so registers) every module of
it on the first lookup (`tunelab.core.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from tunelab.core.registry import Registry
from tunelab.train.interfaces import StepResult


class ExportUnsupported(RuntimeError):
    """This method cannot produce the requested export format."""


class MethodOptions(BaseModel):
    """Base for method configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Capabilities:
    """What a method needs from the code that prepares and trains it (see the module docstring).

    Declared once per class (`capabilities = Capabilities(is_adapter=True)`); a method whose needs depend on its
    options sets its own in `__init__` (MeZO is an adapter with `params: lora`). tests/methods/test_capabilities.py
    checks every registered method's declaration against what it does.
    """

    needs_calibration: bool = False  # calibrate(model, batches) before prepare; prepare raises without it
    calibrates_from_examples: bool = False  # calibrate_from_examples(model, examples, objective, ...) before prepare
    needs_run_length: bool = False  # reads `total_steps` in prepare
    is_adapter: bool = False  # prepare returns a PEFT wrapper whose adapter can be disabled (the frozen base)
    supports_sharding: bool = False  # checked under sharded training; only DDP runs the others
    custom_step: bool = False  # custom_step() updates the weights itself (no backward + optimizer step)
    eager_by_default: bool = False  # `train.compile: auto` leaves its layers eager (compiling costs more than it saves)


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = MethodOptions
    capabilities: Capabilities = Capabilities()  # a class declaration; an instance may refine it from its options
    # What docs/methods.md (`tunelab methods --markdown`) says of the method, with the default options; every
    # registered method sets `trains` (tests check it) and overrides the other two where the default is wrong.
    trains: ClassVar[str] = ""  # which parameters train, in a few words
    mergeable: ClassVar[bool] = True  # merged_model() folds the change into a plain HF model
    adapter_format: ClassVar[str | None] = None  # save_adapter() writes: "peft" | "tunelab" | "sparse_delta" | None

    # set before `prepare` for methods with `capabilities.needs_run_length`: the run's optimizer steps
    total_steps: int | None = None
    # how many training batches `calibrate` wants (`capabilities.needs_calibration`)
    n_calibration_batches: int = 0

    def __init__(self, config: BaseModel | None = None):
        self.config = config if config is not None else self.Config()

    # -- before prepare (see `capabilities`) -------------------------------------------------------
    def calibrate(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
        """Methods with `capabilities.needs_calibration`: keep what `prepare` initialises from, given the first
        `n_calibration_batches` collated SFT training batches (dicts of input_ids/attention_mask/labels [B, T])."""
        raise NotImplementedError(f"method {self.name!r} does not calibrate")

    def calibrate_from_examples(self, model: torch.nn.Module, examples: list[dict], objective: Any, *, pad_id: int,
                                batch_size: int) -> Any:
        """Methods with `capabilities.calibrates_from_examples`: calibrate on the encoded training examples (in
        data order) with the run's objective."""
        raise NotImplementedError(f"method {self.name!r} does not calibrate")

    # -- the model ---------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices only (not on biases, norms or 1-d parameters)."""
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def build_optimizer(self, model: torch.nn.Module, train_config: Any) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own (GaLore's projected AdamW), or None for train.optimizer over
        `param_groups`."""
        return None

    # -- hooks of the training loop ----------------------------------------------------------------
    def on_train_start(self, model: torch.nn.Module, total_steps: int) -> None:
        """Called once before the first step (after a resume's state is loaded): schedules that need the run's
        length."""

    def after_backward(self, model: torch.nn.Module, step: int) -> None:
        """Called with the step's gradients in place, before clipping and the optimizer step (AdaLoRA)."""

    def on_step_end(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step (step counts from 1)."""

    def custom_step(self, *, model, batches, objective, optimizer, lr, step, ref, backend) -> StepResult:
        """An update rule of the method's own (MeZO): the loop calls it instead of backward + optimizer step when
        the method declares `Capabilities(custom_step=True)`, and never otherwise.

        `backend` (tunelab.train.backends) gives the device and `reduce_sum` across processes. It updates the
        weights itself and returns what `tunelab.train.loop.forward_backward` does: a
        `StepResult(loss_sum, metric_sums, global_units, global_tokens)` (this process's loss and metric sums,
        the whole global batch's units and tokens; `loop.global_counts` computes the last two).
        """
        raise NotImplementedError(f"method {self.name!r} has no update rule of its own (capabilities.custom_step "
                                  f"is {self.capabilities.custom_step})")

    # -- state and export --------------------------------------------------------------------------
    def trainable_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model: the trainable tensors, by parameter name."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise KeyError(f"checkpoint has tensors the model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond parameters (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def merged_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain transformers model with the method's change folded into the weights."""
        return model

    def save_adapter(self, model: torch.nn.Module, directory: str) -> None:
        raise ExportUnsupported(f"method {self.name!r} trains the model's own weights; it has no adapter to export")


_METHODS: Registry = Registry("method", package="tunelab.methods", skip=("registry",))


def register(name: str, paper: str | None = None):
    """Class decorator registering a Method under `name`."""
    return _METHODS.register(name, paper)


def get_method_class(name: str) -> type[Method]:
    return _METHODS.get(name)


def list_methods() -> dict[str, type[Method]]:
    return _METHODS.sorted()


def build_method(name: str, options: dict[str, Any]) -> Method:
    cls = get_method_class(name)
    return cls(cls.Config.model_validate(options))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors (tied embeddings) counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
