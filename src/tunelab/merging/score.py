"""Held-out scores for the merges that choose (greedy soup, WiSE-FT alphas sweep).

:class:`TaskScorer` is a ``score_fn(state_dict) -> float`` (higher is better) over built-in tasks:
the state dict is loaded into one model skeleton (built once from ``model_dir``: config, weights
and tokenizer of the merge's base), and the score is, averaged over ``tasks``,

* ``exact_match`` - the fraction of ``n`` held-out items (``split="eval"``, generator seed
  ``seed``) whose greedy answer the task's checker accepts (:func:`tunelab.evaluate.tasks.exact_match`);
* ``loss`` - minus the mean held-out loss per completion token (:func:`tunelab.train.loop.evaluate_loss`
  with the ``sft`` objective) on the same items.

Scoring on the same items the final model is reported on leaks the selection into the report:
give ``score_seed`` a value other than the reporting seed (the built-in generators draw other
items of the held-out split for another seed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Tensor = torch.Tensor
Metric = Literal["exact_match", "loss"]

__all__ = ["TaskScorer"]


@dataclass
class TaskScorer:
    model_dir: str | os.PathLike[str]
    tasks: Sequence[str]
    n: int = 50
    metric: Metric = "exact_match"
    seed: int = 0
    max_new_tokens: int = 24
    batch_size: int = 32
    precision: str = "auto"
    history: list[dict[str, float]] = field(default_factory=list)  # per call: task -> score, and "score"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("a held-out score needs at least one built-in task (parameters.score_task)")
        if self.metric not in ("exact_match", "loss"):
            raise ValueError(f"score_metric must be 'exact_match' or 'loss', got {self.metric!r}")
        from tunelab.data.builtin import get_task

        for t in self.tasks:
            get_task(t)  # KeyError naming the known tasks
        self._model = None

    def _setup(self) -> None:
        from transformers import AutoModelForCausalLM

        from tunelab.data.pipeline import encode_spec, eval_items
        from tunelab.model import load_tokenizer
        from tunelab.objectives.base import build_objective
        from tunelab.recipe import DataConfig, DatasetSpec, ModelConfig

        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._tok = load_tokenizer(ModelConfig(name_or_path=str(self.model_dir)))
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self._model = model.to(self._device).eval()
        self._tied = {k for k in model.state_dict() if k not in dict(model.named_parameters(remove_duplicate=True))}
        data_cfg = DataConfig()
        self._data: dict[str, list] = {}
        for t in self.tasks:
            spec = DatasetSpec(builtin=t, split="eval", n=self.n, seed=self.seed)
            if self.metric == "loss":
                self._data[t] = encode_spec(self._tok, spec, data_cfg)[0]
            else:
                self._data[t] = eval_items(spec, data_cfg)
        self._objective = build_objective("sft", {})

    def load(self, state_dict: Mapping[str, Tensor]) -> torch.nn.Module:
        """The skeleton model holding ``state_dict`` (every tensor of the model must be given, tied copies aside)."""
        if self._model is None:
            self._setup()
        model = self._model
        missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
        missing = [k for k in missing if k not in self._tied]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the model of {self.model_dir}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return model

    def score_task(self, model: torch.nn.Module, task: str) -> float:
        if self.metric == "loss":
            from tunelab.train.loop import evaluate_loss

            loss = evaluate_loss(model, self._objective, self._data[task], batch_size=self.batch_size,
                                 pad_id=self._tok.pad_token_id, device=self._device, precision=self.precision)
            return -float(loss)
        from tunelab.evaluate.tasks import exact_match

        return float(exact_match(model, self._tok, self._data[task], max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size, precision=self.precision, progress=False)["exact_match"])

    def __call__(self, state_dict: Mapping[str, Tensor]) -> float:
        model = self.load(state_dict)
        per_task = {t: self.score_task(model, t) for t in self.tasks}
        score = sum(per_task.values()) / len(per_task)
        self.history.append({**per_task, "score": score})
        return score
