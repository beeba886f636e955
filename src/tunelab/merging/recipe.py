"""Merge recipe: a pydantic model in mergekit's YAML shape.

.. code-block:: yaml

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math-ft            # an HF checkpoint dir ...
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code-lora          # ... or a PEFT LoRA adapter dir (delta = B @ A * scaling)
        parameters: {weight: 0.7}
      - model: runs/sort            # ... or a tunelab run dir (its export/merged or export/adapter)
    parameters: {lambda: 1.0}
    dtype: bfloat16

Unknown keys are rejected with the offending field named, and so are parameters that the chosen
``merge_method`` does not use. Per-model ``weight``/``density`` fall back to the global
``parameters`` values, then to 1.0. ``bitdelta``/``svd_delta`` (``rank``) compress one fine-tune's
delta and write the reconstructed model; ``lora_linear``/``lora_cat``/``lora_svd`` (``rank``) merge
adapters into one adapter. ``greedy_soup`` and ``wise_ft`` with ``alphas`` choose by a held-out
score: ``score_task`` (a built-in task or a list, averaged), ``score_n`` (items, default 50),
``score_metric`` (``exact_match`` or ``loss``, i.e. minus the held-out loss), ``score_seed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.core.precision import DTYPES

MergeMethod = Literal[
    "linear",
    "greedy_soup",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "wise_ft",
    "model_stock",
    "lines",
    "transfer",
    "bitdelta",
    "svd_delta",
    "lora_linear",
    "lora_cat",
    "lora_svd",
]

# Held-out score of greedy_soup / the WiSE-FT alphas sweep (see tunelab.merging.score).
SCORE_PARAMETERS = {"score_task", "score_n", "score_metric", "score_seed"}
# Global parameters each method accepts (names as written in YAML).
METHOD_PARAMETERS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "greedy_soup": set(SCORE_PARAMETERS),
    "task_arithmetic": {"lambda", "weight"},
    "ties": {"lambda", "weight", "density", "sign_method"},
    "dare_linear": {"lambda", "weight", "density", "seed"},
    "dare_ties": {"lambda", "weight", "density", "seed", "sign_method"},
    "slerp": {"t", "dot_threshold"},
    "wise_ft": {"alpha", "alphas"} | SCORE_PARAMETERS,
    "model_stock": set(),
    "lines": {"lambda", "weight", "alpha", "beta", "num_layers"},
    "transfer": {"source_base", "weight"},
    "bitdelta": set(),
    "svd_delta": {"rank"},
    "lora_linear": {"weight"},
    "lora_cat": {"weight"},
    "lora_svd": {"weight", "rank"},
}
MODEL_PARAMETERS: dict[str, set[str]] = {
    m: {"weight", "density"} & p for m, p in METHOD_PARAMETERS.items()
}
NEEDS_BASE = {
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "wise_ft", "model_stock", "lines", "transfer",
    "bitdelta", "svd_delta",
}  # fmt: skip
COMPRESS_METHODS = {"bitdelta", "svd_delta"}  # one fine-tune's delta compressed, reconstructed model written
LORA_METHODS = {"lora_linear", "lora_cat", "lora_svd"}  # adapters in, one PEFT adapter out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelParameters(_Strict):
    weight: float | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0)


class ModelEntry(_Strict):
    model: str
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class MergeParameters(_Strict):
    lambda_: float | None = Field(default=None, alias="lambda")
    weight: float | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0)
    normalize: bool | None = None
    sign_method: Literal["total", "frequency"] | None = None
    seed: int | None = None
    t: float | None = Field(default=None, ge=0.0, le=1.0)
    dot_threshold: float | None = None
    alpha: float | None = None
    alphas: list[float] | None = None
    beta: float | None = None
    num_layers: int | None = Field(default=None, ge=1)
    source_base: str | None = None
    rank: int | None = Field(default=None, ge=1)
    score_task: str | list[str] | None = None
    score_n: int | None = Field(default=None, ge=1)
    score_metric: Literal["exact_match", "loss"] | None = None
    score_seed: int | None = None

    def yaml_names(self) -> set[str]:
        """Names (YAML spelling) of the parameters that were set."""
        return {"lambda" if n == "lambda_" else n for n in self.model_fields_set if getattr(self, n) is not None}


class Recipe(_Strict):
    merge_method: MergeMethod
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: MergeParameters = Field(default_factory=MergeParameters)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        m = self.merge_method
        bad = sorted(self.parameters.yaml_names() - METHOD_PARAMETERS[m])
        if bad:
            raise ValueError(f"parameters.{bad[0]} is not used by merge_method {m!r}")
        for i, entry in enumerate(self.models):
            set_ = {n for n in entry.parameters.model_fields_set if getattr(entry.parameters, n) is not None}
            bad = sorted(set_ - MODEL_PARAMETERS[m])
            if bad:
                raise ValueError(f"models[{i}].parameters.{bad[0]} is not used by merge_method {m!r}")
        if m in NEEDS_BASE and not self.base_model:
            raise ValueError(f"merge_method {m!r} needs base_model")
        n = len(self.models)
        if m == "slerp" and not (n == 2 or (n == 1 and self.base_model)):
            raise ValueError("slerp needs two models, or base_model and one model")
        if m in ("wise_ft", "transfer") and n != 1:
            raise ValueError(f"{m} needs exactly one model besides base_model, got {n}")
        if m == "model_stock" and n < 2:
            raise ValueError("model_stock needs at least two fine-tuned models")
        if m == "transfer" and not self.parameters.source_base:
            raise ValueError("transfer needs parameters.source_base (the base the model was fine-tuned from)")
        if m in COMPRESS_METHODS and n != 1:
            raise ValueError(f"{m} compresses one fine-tune's delta: give exactly one model besides base_model, got {n}")
        if m == "wise_ft" and not self.parameters.alphas:
            bad = sorted(self.parameters.yaml_names() & SCORE_PARAMETERS)
            if bad:
                raise ValueError(f"parameters.{bad[0]} is only used by wise_ft with parameters.alphas (a sweep)")
        return self

    @property
    def needs_score(self) -> bool:
        """greedy_soup and the WiSE-FT alphas sweep choose by a held-out score."""
        return self.merge_method == "greedy_soup" or (self.merge_method == "wise_ft" and bool(self.parameters.alphas))

    @property
    def score_tasks(self) -> list[str]:
        t = self.parameters.score_task
        return [] if t is None else [t] if isinstance(t, str) else list(t)

    # ---- resolved values -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def weights(self) -> list[float]:
        g = self.parameters.weight
        return [e.parameters.weight if e.parameters.weight is not None else (g if g is not None else 1.0) for e in self.models]

    def densities(self) -> list[float]:
        g = self.parameters.density
        return [e.parameters.density if e.parameters.density is not None else (g if g is not None else 1.0) for e in self.models]

    def param(self, name: str, default: Any) -> Any:
        value = getattr(self.parameters, "lambda_" if name == "lambda" else name)
        return default if value is None else value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(by_alias=True, exclude_none=True), sort_keys=False)


def load_recipe(recipe: Recipe | dict[str, Any] | str | os.PathLike[str]) -> Recipe:
    """A :class:`Recipe` from itself, a dict, a YAML file path or a YAML string."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.model_validate(recipe)
    one_line = isinstance(recipe, str) and "\n" not in recipe and len(recipe) < 1024
    looks_like_path = one_line and (recipe.endswith((".yaml", ".yml")) or Path(recipe).is_file())
    if isinstance(recipe, os.PathLike) or looks_like_path:
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"merge recipe {str(recipe)!r} not found")
        text = Path(recipe).read_text(encoding="utf-8")
    else:
        text = str(recipe)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("a merge recipe must be a YAML mapping")
    return Recipe.model_validate(data)
