"""Surgical fine-tuning: train only the k decoder layers that matter most for the task, ranked by Fisher.

Lee et al. 2022, "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts",
https://arxiv.org/abs/2210.11466 (they rank blocks by gradient statistics, e.g. Auto-RGN). Update rule:
W <- AdamW(W, dL/dW) for W in the top-k layers by Fisher score, every other W stays fixed, where the
score of layer l is its mean diagonal empirical Fisher information on a few calibration batches,
    F_l = mean over the layer's entries i and batches b of (dL_b/dW_i)^2.
The mean (not the sum) over entries makes layers of different widths comparable.

Defaults: top_k=2 layers (the `freeze` method's default size), 4 calibration batches.

Calibration must happen BEFORE `prepare` (it needs gradients of every layer):
    method.calibrate(model, batches, objective=objective)      # batches: collated micro-batch dicts
or, from encoded training examples (what the runner calls):
    method.calibrate_from_examples(model, train_data, objective, pad_id=..., batch_size=...)
The selection and scores are kept in `state_dict()`, so a resumed or restored run (`tunelab eval` on a
run directory) trains/loads the same layers without recalibrating. In multi-process runs every process
must calibrate on the same batches (`calibrate_from_examples` takes the first ones, so it does).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from tunelab.methods.freeze import layer_index, num_layers
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register

log = logging.getLogger(__name__)


def layer_fisher(model, batches: list[dict[str, torch.Tensor]], objective=None) -> dict[int, float]:
    """Mean squared gradient per decoder layer: {layer: mean over entries and batches of g^2}.

    The loss of a batch is its mean per unit (objective.compute's loss_sum / n_units), or the model's own
    token-mean `labels` loss when no objective is given. Restores requires_grad and clears .grad after.
    """
    if not batches:
        raise ValueError("surgical: calibration needs at least one batch")
    params = {n: p for n, p in model.named_parameters() if layer_index(n) is not None}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    sq_sum = torch.zeros(num_layers(model), dtype=torch.float64)  # [L] sum over batches and entries of g^2
    numel = torch.zeros(num_layers(model), dtype=torch.float64)  # [L] entries per layer
    for n, p in params.items():
        numel[layer_index(n)] += p.numel()
    was_training = model.training
    model.eval()  # no dropout noise in the scores
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        device = next(model.parameters()).device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            if objective is not None:
                out = objective.compute(model, batch, None)
                loss = out.loss_sum / out.n_units.clamp_min(1)
            else:
                loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             labels=batch["labels"]).loss
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    sq_sum[layer_index(n)] += p.grad.double().pow(2).sum()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)
    scores = sq_sum / (numel.clamp_min(1) * len(batches))
    return {i: float(s) for i, s in enumerate(scores)}


@register("surgical", paper="https://arxiv.org/abs/2210.11466")
class Surgical(Method):
    trains = "the top-k decoder layers by Fisher score (calibration)"
    capabilities = Capabilities(calibrates_from_examples=True, supports_sharding=True)

    class Config(MethodOptions):
        top_k: int = Field(2, ge=1, description="Number of decoder layers to train (highest Fisher score).")
        calibration_batches: int = Field(4, ge=1, description="Batches used to estimate the Fisher scores.")
        modules: list[str] = Field(default_factory=list,
                                   description="Name substrings of extra parameters to train (as in freeze).")

    def __init__(self, config=None):
        super().__init__(config)
        self.scores: dict[int, float] | None = None
        self.layers: list[int] | None = None

    def calibrate(self, model, batches: list[dict[str, torch.Tensor]], objective=None) -> dict[int, float]:
        """Score every decoder layer on `batches` (at most `calibration_batches` are used); pick top_k."""
        batches = list(batches)[: self.config.calibration_batches]
        self.scores = layer_fisher(model, batches, objective)
        if self.config.top_k > len(self.scores):
            raise ValueError(f"method.top_k={self.config.top_k} exceeds the model's {len(self.scores)} layers")
        ranked = sorted(self.scores, key=lambda i: (-self.scores[i], i))
        self.layers = sorted(ranked[: self.config.top_k])
        log.info("surgical: Fisher scores %s -> training layers %s",
                 {i: f"{s:.3g}" for i, s in self.scores.items()}, self.layers)
        return self.scores

    def calibrate_from_examples(self, model, examples: list[dict], objective, *, pad_id: int,
                                batch_size: int) -> dict[int, float]:
        """Calibrate on the first `calibration_batches` batches of encoded examples (in data order)."""
        from tunelab.data.batching import COLLATORS

        collate = COLLATORS[objective.batch_kind]
        n = self.config.calibration_batches * batch_size
        batches = [collate(examples[i: i + batch_size], pad_id) for i in range(0, min(n, len(examples)), batch_size)]
        return self.calibrate(model, batches, objective=objective)

    def prepare(self, model):
        self._model = model
        if self.layers is None:
            # restoring a checkpoint: load_state_dict applies the saved selection next
            log.warning("surgical: prepare() before calibrate(); nothing trains until a selection is loaded")
        self._apply(model)
        return model

    def _apply(self, model) -> None:
        chosen = set(self.layers or [])
        for name, p in model.named_parameters():
            idx = layer_index(name)
            p.requires_grad_((idx is not None and idx in chosen) or any(s in name for s in self.config.modules))

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        if self.layers is None:
            raise RuntimeError("method surgical: call method.calibrate(model, batches) before prepare "
                               "(the runner does this with calibrate_from_examples)")
        return super().param_groups(model, weight_decay)

    def state_dict(self) -> dict[str, Any]:
        if self.layers is None:
            return {}
        return {"layers": self.layers, "scores": {str(i): s for i, s in (self.scores or {}).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = [int(i) for i in state["layers"]]
        if self.layers is not None and self.layers != saved:
            log.warning("surgical: calibration picked %s but the checkpoint trained %s; using the checkpoint's",
                        self.layers, saved)
        self.layers = saved
        self.scores = {int(i): float(s) for i, s in state.get("scores", {}).items()}
        if getattr(self, "_model", None) is not None:
            self._apply(self._model)
