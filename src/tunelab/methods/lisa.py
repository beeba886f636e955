"""LISA: layerwise importance sampling — a few random decoder layers train at a time.

Pan et al. 2024, https://arxiv.org/abs/2403.17919. Update rule: every K steps draw a fresh random set
of gamma decoder layers; W <- AdamW(W, dL/dW) for W in {embeddings, LM head, final norm} + those
layers, every other layer is frozen until it is drawn again.

Defaults: gamma=2 (the paper's main setting), K = `switch_every` = 20 steps (LMFlow's script).
Everything outside `model.layers.*` (embeddings, final norm, LM head) always trains, as in the paper.

Optimizer state across switches (a choice, documented): LMFlow re-creates the optimizer at every
switch but keeps the state of the always-on groups (embeddings/head). Here one optimizer holds every
parameter; AdamW skips parameters whose grad is None, so frozen layers do not move. At a switch the
Adam state of the layers that are frozen is DELETED (it would be stale when they are drawn again and
would waste memory), so a newly unfrozen layer starts from fresh moments (and its own step count, so
bias correction restarts too), layers drawn twice in a row keep their state, and the always-on
parameters keep theirs. Memory for optimizer state is therefore that of the active parameters only.

The draw is a pure function of (seed, period), and `state_dict()` carries the period and the current
layers (JSON), so a resumed run trains the same layers as an uninterrupted one. The first draw is applied
in `on_train_start` (the loop calls it before the first step): until then every parameter is trainable,
so the runner's bf16 storage of frozen linears (`train.frozen_dtype`) never touches a layer that will
train later; the runner's trainable-parameter count therefore shows the whole model.

`SwitchingSubset` is the shared base of methods that train a periodically re-drawn subset (HFT too).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from tunelab.methods.freeze import layer_index, num_layers
from tunelab.methods.registry import Method, MethodOptions, register

log = logging.getLogger(__name__)


def period_generator(seed: int, period: int) -> torch.Generator:
    """A CPU generator for the draw of `period` (0 = the first draw, applied before step 1)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(period))


class SwitchingSubset(Method):
    """Trains a subset of `candidates` that is re-drawn every `switch_every` steps (None = never).

    Subclasses implement `candidate_names(model)` (every parameter that may ever train), `draw(model,
    period)` (the active names of a period), and `encode(active)` / `decode(model, data)` for the
    JSON form of the active set in `state_dict()`.
    """

    state_key = "active"  # name of the active set in state_dict()

    def _switch_every(self) -> int | None:
        return self.config.switch_every

    # -- subclass hooks ----------------------------------------------------------------------------
    def candidate_names(self, model) -> list[str]:
        return [n for n, _ in model.named_parameters()]

    def draw(self, model, period: int) -> set[str]:
        raise NotImplementedError

    def encode(self, active: set[str]) -> Any:
        return sorted(active)

    def decode(self, model, data: Any) -> set[str]:
        return set(data)

    # -- Method interface --------------------------------------------------------------------------
    def prepare(self, model):
        if self._switch_every() and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # DDP only reduces the gradients of parameters that required grad when it wrapped the model
            raise NotImplementedError(f"method {self.name}: re-drawing the trained subset is single-process for "
                                      "now (DDP would need find_unused_parameters and every candidate trainable "
                                      "at wrap time)")
        self._model = model
        self._candidates = set(self.candidate_names(model))
        self.period = 0
        if self._switch_every():
            # every candidate stays trainable until on_train_start: the runner stores FROZEN linear weights in
            # bf16 after prepare (train.frozen_dtype), which would degrade layers that train later
            for name, p in model.named_parameters():
                p.requires_grad_(name in self._candidates)
            self.active, self._pending = set(self._candidates), True
        else:
            self._apply(self.draw(model, 0), optimizer=None)
        return model

    def on_train_start(self, model, total_steps: int) -> None:
        """Apply the draw of the current period (the loop calls this after a resume's state is loaded)."""
        if self._pending:
            self._apply(self.draw(self._model, self.period), optimizer=None)

    def _apply(self, active: set[str], optimizer) -> None:
        unknown = active - self._candidates
        if unknown:
            raise ValueError(f"method {self.name}: drawn parameters are not candidates: {sorted(unknown)[:3]}")
        for name, p in self._model.named_parameters():
            on = name in active
            if optimizer is not None and p.requires_grad and not on:
                optimizer.state.pop(p, None)  # frozen now: its moments would be stale when it returns
            p.requires_grad_(on)
        self.active, self._pending = set(active), False

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        # every candidate, trainable now or later; AdamW skips those whose grad is None
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if name in self._candidates:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_step_end(self, model, step: int, optimizer) -> None:
        every = self._switch_every()
        if every and step % every == 0:
            self.period = step // every
            self._apply(self.draw(self._model, self.period), optimizer)
            log.info("%s: period %d, training %s", self.name, self.period, self.describe())

    def describe(self) -> str:
        return f"{len(self.active)} parameter tensors"

    def trainable_state_dict(self, model):
        # every candidate: layers trained in earlier periods changed too
        return {n: p.detach() for n, p in model.named_parameters() if n in self._candidates}

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period, self.state_key: self.encode(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.period = int(state["period"])
        # the optimizer state in the same checkpoint was saved with this active set: nothing to reset
        self._apply(self.decode(self._model, state[self.state_key]), optimizer=None)


@register("lisa", paper="https://arxiv.org/abs/2403.17919")
class LISA(SwitchingSubset):
    trains = "embeddings, LM head and a few random decoder layers, re-drawn every K steps"
    class Config(MethodOptions):
        gamma: int = Field(2, ge=1, description="Decoder layers trained at a time.")
        switch_every: int = Field(20, ge=1, description="Steps between re-draws of the trained layers (K).")
        seed: int = Field(0, description="Seed of the layer draws (draw p uses seed and p only).")

    state_key = "layers"

    def prepare(self, model):
        if self.config.gamma > num_layers(model):
            raise ValueError(f"method.gamma={self.config.gamma} exceeds the model's {num_layers(model)} layers")
        return super().prepare(model)

    def draw(self, model, period: int) -> set[str]:
        layers = self.draw_layers(num_layers(model), period)
        return {n for n, _ in model.named_parameters() if layer_index(n) is None or layer_index(n) in layers}

    def draw_layers(self, n_layers: int, period: int) -> list[int]:
        perm = torch.randperm(n_layers, generator=period_generator(self.config.seed, period))
        return sorted(perm[: self.config.gamma].tolist())

    @property
    def layers(self) -> list[int]:
        """Decoder layers trained in the current period."""
        return sorted({layer_index(n) for n in self.active} - {None})

    def encode(self, active: set[str]) -> list[int]:
        return sorted({layer_index(n) for n in active} - {None})

    def decode(self, model, data: list[int]) -> set[str]:
        chosen = set(int(i) for i in data)
        return {n for n, _ in model.named_parameters() if layer_index(n) is None or layer_index(n) in chosen}

    def describe(self) -> str:
        return f"layers {self.layers}"
