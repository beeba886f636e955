"""The search space of a sweep: recipe fields to sample, with the method (and objective) as conditional choices.

```yaml
space:
  train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}    # float (log-uniform)
  train.batch_size: {choices: [4, 8]}                 # categorical
  train.warmup_ratio: 0.1                             # fixed
  method:                                             # conditional: the method is categorical,
    lora: {r: {choices: [4, 8, 16]}, alpha: 16}       #   each method's options exist only under it
    ia3: {}
```

A parameter is `{choices: [...]}`, `{low, high}` (+ `log`, `step`, `type: int | float`; int when both bounds are
integers), or a plain value (fixed). Top-level keys are dotted recipe fields (checked against `describe_fields`);
`method` / `objective` map registered names to their options' spaces (checked against each class's `Config`).

In Optuna a conditional option is its own parameter, `method.<name>.<option>` (so `method.lora.r` and
`method.dora.r` never share a distribution, which Optuna requires); `method` itself is a categorical parameter
over the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tunelab.recipe import RecipeError, describe_fields

CONDITIONAL = ("method", "objective")  # sections whose `name` picks a class with options of its own


@dataclass(frozen=True)
class Param:
    """One dimension: categorical (`choices`), int or float range, or a fixed value."""

    kind: str  # "categorical" | "int" | "float" | "fixed"
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    value: Any = None

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> list[Any]:
        """Values that together exercise validation: every choice, both bounds, the fixed value."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def parse_param(where: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        return Param("fixed", value=spec)
    keys = set(spec)
    if "choices" in keys:
        if keys - {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise RecipeError(f"sweep space '{where}': `choices` takes a non-empty list and nothing beside it")
        bad = [c for c in spec["choices"] if not isinstance(c, (str, int, float, bool)) and c is not None]
        if bad:  # Optuna stores categorical values as they are: scalars only
            raise RecipeError(f"sweep space '{where}': choices must be plain values (got {bad[0]!r})")
        return Param("categorical", choices=tuple(spec["choices"]))
    if {"low", "high"} <= keys and not keys - {"low", "high", "log", "step", "type"}:
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise RecipeError(f"sweep space '{where}': low and high must be numbers")
        kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
        if kind not in ("int", "float"):
            raise RecipeError(f"sweep space '{where}': type must be int or float (got {kind!r})")
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise RecipeError(f"sweep space '{where}': needs finite low <= high (got {low}, {high})")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise RecipeError(f"sweep space '{where}': a log range needs low > 0")
        if log and spec.get("step") is not None:
            raise RecipeError(f"sweep space '{where}': Optuna takes `log` or `step`, not both")
        return Param(kind, low=float(low), high=float(high), log=log, step=spec.get("step"))
    raise RecipeError(f"sweep space '{where}': give {{choices: [...]}}, {{low, high[, log, step, type]}} or a plain "
                      f"value (got keys {sorted(keys)})")


@dataclass
class SearchSpace:
    """`fields`: dotted recipe field -> Param; `conditional`: section -> {registered name -> {option -> Param}}."""

    fields: dict[str, Param]
    conditional: dict[str, dict[str, dict[str, Param]]]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Suggest every parameter on an Optuna trial; returns {dotted key: value} for the trial's recipe, the
        conditional sections as {"method": {"name": ..., option: value}}."""
        out: dict[str, Any] = {}
        for key, p in self.fields.items():
            out[key] = p.suggest(trial, key)
        for section, names in self.conditional.items():
            name = trial.suggest_categorical(section, list(names))
            out[section] = {"name": name, **{opt: p.suggest(trial, f"{section}.{name}.{opt}")
                                             for opt, p in names[name].items()}}
        return out

    def corners(self) -> list[dict[str, Any]]:
        """A few assignments covering every choice and bound (each dimension's values in turn, the others at
        their first): validated before any trial runs, so a bad option fails the sweep, not trial 7."""
        first = {k: p.extremes()[0] for k, p in self.fields.items()}
        out = []
        for key, p in self.fields.items():
            out += [{**first, key: v} for v in p.extremes()]
        sections = {s: {n: {o: p.extremes()[0] for o, p in opts.items()} for n, opts in names.items()}
                    for s, names in self.conditional.items()}
        for section, names in self.conditional.items():
            for name, opts in names.items():
                base = {**first, **{s: {"name": next(iter(v)), **next(iter(v.values()))} for s, v in sections.items()}}
                out.append({**base, section: {"name": name, **sections[section][name]}})
                for opt, p in opts.items():
                    out += [{**base, section: {"name": name, **sections[section][name], opt: v}}
                            for v in p.extremes()]
        return out or [{}]


def parse_space(raw: Any) -> SearchSpace:
    """Check a space's shape and its names (recipe fields; registered methods/objectives and their options)."""
    if not isinstance(raw, dict) or not raw:
        raise RecipeError("sweep space: a mapping of recipe fields to parameters (docs/sweep.md)")
    known = {path for path, _, _ in describe_fields()}
    fields: dict[str, Param] = {}
    conditional: dict[str, dict[str, dict[str, Param]]] = {}
    for key, spec in raw.items():
        key = str(key)
        if key in CONDITIONAL:
            conditional[key] = _parse_conditional(key, spec)
        elif key.split(".")[0] in CONDITIONAL:
            raise RecipeError(f"sweep space '{key}': {key.split('.')[0]} options go under the {key.split('.')[0]} "
                              f"they belong to, e.g. `method: {{lora: {{r: {{choices: [4, 8]}}}}}}`")
        elif key not in known:
            raise RecipeError(f"sweep space '{key}': not a recipe field (`tunelab recipe` lists them)")
        else:
            fields[key] = parse_param(key, spec)
    return SearchSpace(fields, conditional)


def _parse_conditional(section: str, spec: Any) -> dict[str, dict[str, Param]]:
    from tunelab.core.registry import UnknownName
    from tunelab.methods.registry import get_method_class
    from tunelab.objectives.base import get_objective_class

    getter = get_method_class if section == "method" else get_objective_class
    if isinstance(spec, list):  # `method: [lora, ia3]`: each with its default options
        spec = {n: {} for n in spec}
    if not isinstance(spec, dict) or not spec:
        raise RecipeError(f"sweep space '{section}': a mapping of {section} names to their options' spaces")
    out: dict[str, dict[str, Param]] = {}
    for name, options in spec.items():
        try:
            cls = getter(str(name))
        except UnknownName as e:
            raise RecipeError(f"sweep space '{section}.{name}': {e}") from None
        options = options or {}
        if not isinstance(options, dict):
            raise RecipeError(f"sweep space '{section}.{name}': a mapping of options (got {options!r})")
        unknown = sorted(set(map(str, options)) - set(cls.Config.model_fields))
        if unknown:
            raise RecipeError(f"sweep space '{section}.{name}.{unknown[0]}': not an option of {section} {name!r} "
                              f"(it has: {', '.join(cls.Config.model_fields) or 'none'})")
        out[str(name)] = {str(o): parse_param(f"{section}.{name}.{o}", p) for o, p in options.items()}
    return out
