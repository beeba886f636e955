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

mergekit's own syntax (docs/merging.md, "mergekit configs"):

* a parameter value may be a *gradient* ``[1, 0.7, 0.1]``, interpolated over the layers: layer ``i`` of a
  slice of ``n`` layers reads the list at ``t = i / (n - 1)`` (``np.interp`` on an even grid; ``t = 1`` for a
  one-layer slice, ``t = 0`` for tensors outside the layers: embeddings, final norm, LM head); booleans and
  strings pick ``values[int(t * (len - 1))]``;
* or *filter-conditioned* ``[{filter: mlp, value: 0.5}, {value: 0}]``: the first entry whose ``filter`` is a
  substring of the tensor name (or that has none, or ``*``) gives the value, itself a scalar or a gradient;
* precedence: a source's (model's) parameters, then its slice's, then the global ``parameters``, then the
  method's default;
* ``slices:`` of ``sources:`` with ``layer_range: [start, end)`` instead of ``models:``: each slice's layers are
  merged from its sources (all of equal length) and the slices are stacked (``passthrough`` with one source per
  slice is the "frankenmerge"); embeddings come from the first slice's sources, final norm and head from the
  last one's;
* ``tokenizer_source: base | union | <model>``: whose tokenizer files the output gets (inputs must share one
  vocabulary; merging differing vocabularies is not supported and is refused);
* ``normalize``, ``rescale``, ``int8_mask`` and ``lambda`` of the task-vector methods, with mergekit's defaults
  (:data:`MERGEKIT_DEFAULTS`).

``convention`` (tunelab's, default ``mergekit``) picks the semantics of ``ties`` / ``dare_ties`` /
``dare_linear``: ``mergekit`` (sign elected on the *weighted* task vectors, ``normalize`` divides by the summed
weights of the agreeing ones, ``rescale`` matches each pruned vector's L1 norm to the unpruned one) or ``peft``
(``peft.utils.merge_utils``: sign on the unweighted vectors, disjoint mean over the agreeing ones, DARE rescales
by ``1 / density``). Both agree for TIES when every weight is 1. mergekit keys tunelab does not implement
(``modules``, ``tokenizer``, ``chat_template``, a slice's ``base_model``, ...) are refused naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

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
    "passthrough",
]

# Held-out score of greedy_soup / the WiSE-FT alphas sweep (see tunelab.merging.score).
SCORE_PARAMETERS = {"score_task", "score_n", "score_metric", "score_seed"}
# Global parameters each method accepts (names as written in YAML).
_TASK = {"lambda", "weight", "density", "normalize", "rescale", "int8_mask"}  # mergekit's task-vector parameters
METHOD_PARAMETERS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "greedy_soup": set(SCORE_PARAMETERS),
    "task_arithmetic": set(_TASK),
    "ties": _TASK | {"sign_method"},
    "dare_linear": _TASK | {"seed"},
    "dare_ties": _TASK | {"seed", "sign_method"},
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
    "passthrough": {"scale"},
}
MODEL_PARAMETERS: dict[str, set[str]] = {
    m: {"weight", "density", "scale"} & p for m, p in METHOD_PARAMETERS.items()
}
# mergekit's defaults of the task-vector methods (generalized_task_arithmetic): normalize, rescale
MERGEKIT_DEFAULTS: dict[str, dict[str, bool]] = {
    "task_arithmetic": {"normalize": False, "rescale": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": False, "rescale": True},
}
# parameters whose value may be a gradient or filter-conditioned (others are plain values)
SETTING_PARAMETERS = {"weight", "density", "lambda", "normalize", "rescale", "int8_mask", "t", "alpha", "beta", "scale"}
# mergekit keys tunelab refuses, with the reason
UNSUPPORTED_KEYS = {
    "modules": "mergekit's per-module configs (multimodal models) are not supported: use models or slices",
    "tokenizer": "mergekit's tokenizer block (token surgery, pad_to_multiple_of) is not supported: use "
                 "tokenizer_source: base or a model",
    "chat_template": "not supported: the output keeps its tokenizer's chat template",
    "out_dtype": "not supported: dtype is the output dtype (tunelab computes in float32)",
}
NEEDS_BASE = {
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "wise_ft", "model_stock", "lines", "transfer",
    "bitdelta", "svd_delta",
}  # fmt: skip
COMPRESS_METHODS = {"bitdelta", "svd_delta"}  # one fine-tune's delta compressed, reconstructed model written
LORA_METHODS = {"lora_linear", "lora_cat", "lora_svd"}  # adapters in, one PEFT adapter out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


T = TypeVar("T")
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Scalar = Union[bool, int, float, str]


class Conditional(_Strict, Generic[T]):
    """``{filter: mlp, value: 0.5}``: the value for tensors whose name contains ``filter`` (none or ``*``: all)."""

    filter: str | None = None
    value: Union[T, list[T]]


# a scalar, a gradient over layers, a filter-conditioned value, or a list of those (first matching filter wins)
Setting = Union[T, list[T], Conditional[T], list[Conditional[T]]]


def evaluate_setting(setting: Any, tensor: str = "", t: float = 0.0) -> Any:
    """The value of a parameter setting for tensor ``tensor`` at layer position ``t`` in [0, 1] (module docstring:
    gradients interpolate numbers on an even grid, pick booleans; the first matching filter wins); None if no
    filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if not any(isinstance(e, Conditional) for e in setting):
        if any(isinstance(e, (bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor and cond.filter in tensor):
            return evaluate_setting(cond.value, tensor, t)
    return None


def _is_plain(setting: Any) -> bool:
    return setting is None or not isinstance(setting, (list, Conditional))


class ModelParameters(_Strict):
    weight: Setting[float] | None = None
    density: Setting[Unit] | None = None
    scale: Setting[float] | None = None

    def names(self) -> set[str]:
        return {n for n in type(self).model_fields if getattr(self, n) is not None}


class ModelEntry(_Strict):
    model: str
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class MergeParameters(_Strict):
    lambda_: Setting[float] | None = Field(default=None, alias="lambda")
    weight: Setting[float] | None = None
    density: Setting[Unit] | None = None
    normalize: Setting[bool] | None = None
    rescale: Setting[bool] | None = None
    int8_mask: Setting[bool] | None = None
    scale: Setting[float] | None = None
    sign_method: Literal["total", "frequency"] | None = None
    seed: int | None = None
    t: Setting[Unit] | None = None
    dot_threshold: float | None = None
    alpha: Setting[float] | None = None
    alphas: list[float] | None = None
    beta: Setting[float] | None = None
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

    def get(self, name: str) -> Any:
        return getattr(self, "lambda_" if name == "lambda" else name, None)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: ModelParameters = Field(default_factory=ModelParameters)

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        a, b = self.layer_range
        if not 0 <= a < b:
            raise ValueError(f"layer_range {list(self.layer_range)} must be [start, end) with 0 <= start < end")
        return self


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: MergeParameters = Field(default_factory=MergeParameters)

    @property
    def length(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class Recipe(_Strict):
    merge_method: MergeMethod
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] = Field(default_factory=list)
    parameters: MergeParameters = Field(default_factory=MergeParameters)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None
    convention: Literal["mergekit", "peft"] = "mergekit"

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in UNSUPPORTED_KEYS.items():
                if key in data:
                    raise ValueError(f"{key}: {why}")
            for i, sl in enumerate(data.get("slices") or []):
                if isinstance(sl, dict) and "base_model" in sl:
                    raise ValueError(f"slices[{i}].base_model: a per-slice base model is not supported (use the "
                                     "top-level base_model)")
                if isinstance(sl, dict) and "residual_weight" in sl:
                    raise ValueError(f"slices[{i}].residual_weight: not supported")
        return data

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        m = self.merge_method
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models or slices")
        bad = sorted(self.parameters.yaml_names() - METHOD_PARAMETERS[m])
        if bad:
            raise ValueError(f"parameters.{bad[0]} is not used by merge_method {m!r}")
        for i, sl in enumerate(self.slices):
            bad = sorted(sl.parameters.yaml_names() - METHOD_PARAMETERS[m])
            if bad:
                raise ValueError(f"slices[{i}].parameters.{bad[0]} is not used by merge_method {m!r}")
            if len({s.layer_range[1] - s.layer_range[0] for s in sl.sources}) != 1:
                raise ValueError(f"slices[{i}]: every source of a slice must have the same number of layers")
            for j, src in enumerate(sl.sources):
                bad = sorted(src.parameters.names() - MODEL_PARAMETERS[m])
                if bad:
                    raise ValueError(f"slices[{i}].sources[{j}].parameters.{bad[0]} is not used by merge_method {m!r}")
        for i, entry in enumerate(self.models):
            bad = sorted(entry.parameters.names() - MODEL_PARAMETERS[m])
            if bad:
                raise ValueError(f"models[{i}].parameters.{bad[0]} is not used by merge_method {m!r}")
        if m in NEEDS_BASE and not self.base_model:
            raise ValueError(f"merge_method {m!r} needs base_model")
        if self.slices and m not in PER_TENSOR_SLICE_METHODS:
            raise ValueError(f"slices: merge_method {m!r} takes models, not slices")
        if m == "passthrough":
            if any(len(sl.sources) != 1 for sl in self.slices) or len(self.models) > 1:
                raise ValueError("passthrough takes exactly one source per slice (or one model)")
        elif self.slices:
            self._check_counts(m, max(len(sl.sources) for sl in self.slices), slices=True)
        else:
            self._check_counts(m, len(self.models))
        if m == "transfer" and not self.parameters.source_base:
            raise ValueError("transfer needs parameters.source_base (the base the model was fine-tuned from)")
        if m == "wise_ft" and not self.parameters.alphas:
            bad = sorted(self.parameters.yaml_names() & SCORE_PARAMETERS)
            if bad:
                raise ValueError(f"parameters.{bad[0]} is only used by wise_ft with parameters.alphas (a sweep)")
        if self.merge_method in LORA_METHODS | COMPRESS_METHODS | {"greedy_soup"} or self.parameters.alphas:
            self._require_plain()
        return self

    def _check_counts(self, m: str, n: int, slices: bool = False) -> None:
        # with slices the base model is one of a slice's sources
        n_other = n - 1 if slices and m in NEEDS_BASE | {"slerp"} else n
        if m == "slerp" and not (n == 2 or (n == 1 and self.base_model)):
            raise ValueError("slerp needs two models, or base_model and one model")
        if m in ("wise_ft", "transfer") and n_other != 1:
            raise ValueError(f"{m} needs exactly one model besides base_model, got {n_other}")
        if m == "model_stock" and n_other < 2:
            raise ValueError("model_stock needs at least two fine-tuned models")
        if m in COMPRESS_METHODS and n_other != 1:
            raise ValueError(f"{m} compresses one fine-tune's delta: give exactly one model besides base_model, got "
                             f"{n_other}")

    def _require_plain(self) -> None:
        """Whole-model methods (soups, compression, LoRA-level) take plain values, not gradients or filters."""
        where = [("parameters", self.parameters.get(n)) for n in SETTING_PARAMETERS] + \
            [(f"models[{i}].parameters", getattr(e.parameters, n)) for i, e in enumerate(self.models)
             for n in ("weight", "density", "scale")]
        for prefix, value in where:
            if not _is_plain(value):
                raise ValueError(f"{prefix}: merge_method {self.merge_method!r} takes plain values, not gradients or "
                                 "filter-conditioned ones")

    @property
    def needs_score(self) -> bool:
        """greedy_soup and the WiSE-FT alphas sweep choose by a held-out score."""
        return self.merge_method == "greedy_soup" or (self.merge_method == "wise_ft" and bool(self.parameters.alphas))

    @property
    def score_tasks(self) -> list[str]:
        t = self.parameters.score_task
        return [] if t is None else [t] if isinstance(t, str) else list(t)

    @property
    def model_refs(self) -> list[str]:
        """Every input model, in order of first appearance (models, or the slices' sources)."""
        refs = [e.model for e in self.models] + [s.model for sl in self.slices for s in sl.sources]
        return list(dict.fromkeys(refs))

    # ---- resolved values -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def resolve(self, name: str, default: Any, *scopes: Any, tensor: str = "", t: float = 0.0) -> Any:
        """Parameter ``name`` for ``tensor`` at layer position ``t``: the first of ``scopes`` (parameter objects,
        highest precedence first; the global ``parameters`` are searched last) that gives a value, else
        ``default`` (``MERGEKIT_DEFAULTS`` for normalize / rescale when ``default`` is None)."""
        for scope in (*scopes, self.parameters):
            setting = scope.get(name) if isinstance(scope, MergeParameters) else getattr(scope, name, None)
            value = evaluate_setting(setting, tensor, t)
            if value is not None:
                return value
        if default is None and name in ("normalize", "rescale"):
            default = MERGEKIT_DEFAULTS.get(self.merge_method, {}).get(name, False)
        return default

    def weights(self, tensor: str = "", t: float = 0.0) -> list[float]:
        return [float(self.resolve("weight", 1.0, e.parameters, tensor=tensor, t=t)) for e in self.models]

    def densities(self, tensor: str = "", t: float = 0.0) -> list[float]:
        return [float(self.resolve("density", 1.0, e.parameters, tensor=tensor, t=t)) for e in self.models]

    def param(self, name: str, default: Any, tensor: str = "", t: float = 0.0) -> Any:
        return self.resolve(name, default, tensor=tensor, t=t)

    def to_yaml(self) -> str:
        data = self.model_dump(by_alias=True, exclude_none=True)
        for key in ("models", "slices"):
            if not data[key]:
                del data[key]
        if self.convention == "mergekit":
            del data["convention"]
        return yaml.safe_dump(data, sort_keys=False)


PER_TENSOR_SLICE_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock",
                            "passthrough"}


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
