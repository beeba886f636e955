"""The sweep recipe: a base Recipe, a search space, the objectives, the budget and the Optuna settings.

```yaml
name: sweep-lora
output_dir: runs                # the sweep directory is <output_dir>/<name>
base: {...}                     # an ordinary recipe (docs/recipe.md): what every trial starts from
space: {...}                    # sweep/space.py
objectives: [eval.exact_match:max, train.peak_memory_mb:min]
trials: 12                      # the study's total number of trials (all workers together)
sampler: {name: auto}           # auto = TPE for one objective, NSGA-II for several
pruner: {name: none}            # median | percentile | hyperband | threshold (one objective only)
storage: null                   # default: sqlite:///<sweep dir>/study.db
```

`tunelab sweep RECIPE.yaml --space space.yaml --objective ...` builds the same thing from an ordinary recipe.
Validated before any trial runs: shape (unknown keys named by their dotted field), the base recipe and every
corner of the space against the registries, the objectives against what the base recipe evaluates.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tunelab.core.rundir import check_component
from tunelab.recipe import Recipe, RecipeError, _Strict, apply_overrides, format_validation_error
from tunelab.sweep.objectives import SweepObjective, check_against_recipe, parse_objective
from tunelab.sweep.space import SearchSpace, parse_space
from tunelab.validate import validate_recipe


class SamplerConfig(_Strict):
    """Optuna's sampler."""

    name: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto = TPE (one objective) or NSGA-II (several).")
    seed: int = Field(0, description="Sampler seed: the same seed and results give the same suggestions.")
    n_startup_trials: int | None = Field(None, ge=0, description="TPE: random trials before modelling (default: a "
                                         "third of the trials, at most 10).")
    population_size: int | None = Field(None, ge=2, description="NSGA-II: trials per generation (default: half the "
                                        "trials, between 2 and 50).")


class PrunerConfig(_Strict):
    """Stopping unpromising trials early from the intermediate values the training loop logs (metrics.jsonl:
    the held-out `eval_loss` every `train.eval_every` steps, else the training loss). Optuna prunes
    single-objective studies only."""

    name: Literal["none", "median", "percentile", "hyperband", "threshold"] = "none"
    n_startup_trials: int = Field(2, ge=0, description="median/percentile: trials finished before pruning starts.")
    n_warmup_steps: int = Field(0, ge=0, description="median/percentile: steps of each trial never pruned.")
    percentile: float = Field(50.0, gt=0, lt=100, description="percentile: prune below this percentile.")
    upper: float | None = Field(None, description="threshold: prune when the intermediate loss exceeds this.")


class SweepRecipe(_Strict):
    """A multi-objective search over ordinary runs (one run directory per trial)."""

    name: str = Field("sweep", description="Sweep name; the sweep directory is `<output_dir>/<name>`.")
    output_dir: str = Field("runs", description="Parent directory of the sweep directory.")
    base: dict[str, Any] = Field(default_factory=dict, description="The recipe every trial starts from "
                                 "(docs/recipe.md); the sampled values replace its fields.")
    space: dict[str, Any] = Field(..., description="Recipe fields to search (docs/sweep.md).")
    objectives: list[str] = Field(..., min_length=1, description="METRIC:max or METRIC:min, e.g. "
                                  "eval.exact_match:max train.peak_memory_mb:min.")
    trials: int = Field(10, ge=1, description="Total trials of the study (every worker counts toward it).")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    storage: str | None = Field(None, description="Optuna storage URL (sqlite:///, postgresql://, mysql://) or "
                                "journal:PATH (a journal file on a shared file system); default: a SQLite file "
                                "in the sweep directory.")
    study_name: str | None = Field(None, description="Study name in the storage (default: `name`).")
    trial_timeout_s: float | None = Field(None, gt=0, description="Stop a trial that runs longer (it fails).")

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        return check_component(v, "sweep name")  # `<output_dir>/<name>` must never leave output_dir

    @field_validator("objectives", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checks(self) -> "SweepRecipe":
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ValueError("pruning needs a single objective (Optuna prunes single-objective studies only)")
        if self.pruner.name == "threshold" and self.pruner.upper is None:
            raise ValueError("pruner threshold needs `upper`")
        return self

    # -- derived, validated ------------------------------------------------------------------------
    def parsed_objectives(self) -> list[SweepObjective]:
        return [parse_objective(o) for o in self.objectives]

    def parsed_space(self) -> SearchSpace:
        return parse_space(self.space)

    def base_recipe(self) -> Recipe:
        return _validated(self.base, "base")

    def trial_recipe(self, values: dict[str, Any], name: str, output_dir: str | Path) -> Recipe:
        """The base with the sampled values (SearchSpace.sample) set: dotted fields replaced, a sampled method or
        objective section replaced whole (the base's options kept only when it names the same class)."""
        data = copy.deepcopy(self.base)
        data["name"], data["output_dir"] = name, str(output_dir)
        for key, value in values.items():
            if isinstance(value, dict) and key in ("method", "objective"):
                section = data.get(key) or {}
                kept = section if section.get("name", value["name"]) == value["name"] else {}
                data[key] = {**kept, **value}
            else:
                node = data
                *parents, last = key.split(".")
                for p in parents:
                    if not isinstance(node.get(p), dict):
                        node[p] = {}
                    node = node[p]
                node[last] = value
        return _validated(data, "trial")


def _validated(data: dict[str, Any], where: str) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, prefix="base")) from None
    try:
        return validate_recipe(recipe)
    except RecipeError as e:
        raise RecipeError(str(e).replace("recipe field '", "recipe field 'base.")) from None


def check_sweep(sr: SweepRecipe) -> SweepRecipe:
    """Everything that can be checked before a trial runs (see the module docstring)."""
    base = sr.base_recipe()
    objectives = sr.parsed_objectives()
    check_against_recipe(objectives, base)
    space = sr.parsed_space()
    for values in space.corners():
        try:
            sr.trial_recipe(values, "check", base.output_dir)
        except RecipeError as e:
            raise RecipeError(f"sweep space: the trial {values} is not a valid recipe: {e}") from None
    return sr


def parse_sweep(data: dict[str, Any]) -> SweepRecipe:
    try:
        sr = SweepRecipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e)) from None
    return check_sweep(sr)


def is_sweep_file(path: str | Path) -> bool:
    """A sweep recipe (has `space` or `base`) rather than an ordinary recipe."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and ("space" in data or "base" in data)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {what} must be a mapping, got {type(data).__name__}")
    return data


def load_sweep(path: str | Path | None, overrides: list[str] | None = None, *, space: str | Path | None = None,
               objectives: list[str] | None = None, trials: int | None = None, storage: str | None = None,
               study_name: str | None = None, name: str | None = None, pruner: str | None = None) -> SweepRecipe:
    """A sweep recipe file (overrides address its fields: `trials=4`, `base.train.lr=1e-3`), or an ordinary recipe
    (overrides address the recipe) with `space` and `objectives` given; the other arguments replace the file's."""
    if path is not None and is_sweep_file(path):
        data = apply_overrides(read_yaml_mapping(path, "sweep recipe"), overrides or [])
    else:
        if space is None:
            raise RecipeError("an ordinary recipe needs --space SPACE.yaml (or give a sweep recipe with `space:`)")
        base = apply_overrides(read_yaml_mapping(path, "recipe") if path is not None else {}, overrides or [])
        data = {"name": f"sweep-{base.get('name', 'run')}", "output_dir": base.get("output_dir", "runs"),
                "base": base, "objectives": objectives or []}
    if space is not None:
        raw = read_yaml_mapping(space, "sweep space")
        data["space"] = raw.get("space", raw) if set(raw) == {"space"} else raw
    for key, value in (("objectives", objectives), ("trials", trials), ("storage", storage),
                       ("study_name", study_name), ("name", name)):
        if value:
            data[key] = value
    if pruner:
        data["pruner"] = {**(data["pruner"] if isinstance(data.get("pruner"), dict) else {}), "name": pruner}
    return parse_sweep(data)


def sweep_to_yaml(sr: SweepRecipe) -> str:
    return yaml.safe_dump(sr.model_dump(mode="json"), sort_keys=False)
