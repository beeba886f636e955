"""The continual recipe: a base Recipe (model, method, objective, training, evaluation settings) plus a stream
of stages, the anti-forgetting strategies and the general-ability evaluation.

```yaml
name: cl-lora
base:                                   # an ordinary recipe (docs/recipe.md) minus its data files
  model: {name_or_path: smollm2-135m-instruct}
  method: {name: lora, r: 16, alpha: 32}
  train: {max_steps: 60, batch_size: 8, lr: 1.0e-3}
stages:                                 # one training stage per task, in this order
  - {builtin: date_format, n: 1000}
  - {builtin: arithmetic}
  - {name: support, train: {path: data/support.jsonl}, eval: {path: data/support_dev.jsonl}}
strategy: [{name: replay, buffer_size: 200, ratio: 0.2}, {name: ewc, weight: 1000}]
general: {ppl: [wiki.test.raw], mc: [arc-easy/test.jsonl], n: 100}
joint: true                             # also train the multi-task upper bound
```

Validated like a Recipe: unknown keys are errors naming the dotted field (`stages.1.bulitin`), the base's
method/objective options by their own Config classes, each strategy's options by the strategy's Config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.recipe import (
    DatasetSpec,
    Recipe,
    RecipeError,
    _Strict,
    apply_overrides,
    describe_fields,
    format_validation_error,
)
from tunelab.validate import validate_recipe


class StageSpec(_Strict):
    """One task of the stream: a built-in task, or user train/eval files."""

    name: str | None = Field(None, description="Task name in the R matrix (default: the built-in name, else the "
                                               "train file's stem).")
    builtin: str | None = Field(None, description="A built-in task (`tunelab tasks`): train and eval items generated.")
    n: int = Field(1000, ge=1, description="Built-in task: training examples generated.")
    eval_n: int = Field(100, ge=1, description="Held-out items scored after every stage (built-in: generated; "
                                               "files: the first eval_n).")
    seed: int = Field(0, description="Built-in task: generator seed (train and eval splits are disjoint anyway).")
    train: DatasetSpec | None = Field(None, description="User task: training data (any format of docs/recipe.md).")
    eval: DatasetSpec | None = Field(None, description="User task: held-out chat data; the last assistant turn (or an "
                                                       "`answer` field) is the reference of exact match.")
    max_steps: int | None = Field(None, ge=1, description="This stage's optimizer steps (default: base.train).")
    epochs: float | None = Field(None, gt=0, description="This stage's epochs (default: base.train).")

    @model_validator(mode="after")
    def _one_source(self) -> "StageSpec":
        if (self.builtin is None) == (self.train is None):
            raise ValueError("give exactly one of `builtin` or `train`")
        if self.train is not None and self.eval is None:
            raise ValueError("a user task needs `eval` data too (held-out items scored after every stage)")
        if self.builtin is not None and self.eval is not None:
            raise ValueError("`eval` is for user tasks; a built-in task generates its own held-out items")
        return self

    @property
    def task_name(self) -> str:
        if self.name:
            return self.name
        if self.builtin:
            return self.builtin
        src = self.train.builtin or Path(self.train.path).name
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
            src = src.removesuffix(suffix)
        return src

    def train_spec(self) -> DatasetSpec:
        if self.builtin:
            return DatasetSpec(builtin=self.builtin, split="train", n=self.n, seed=self.seed)
        return self.train

    def eval_spec(self) -> DatasetSpec:
        if self.builtin:
            return DatasetSpec(builtin=self.builtin, split="eval", n=self.eval_n, seed=self.seed)
        return self.eval.model_copy(update={"n": self.eval.n or self.eval_n})


class StrategyConfig(BaseModel):
    """`name` picks a registered strategy; its other keys are validated by that strategy's Config."""

    model_config = ConfigDict(extra="allow")
    name: str = "naive"

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name"}


class GeneralEvalConfig(_Strict):
    """General ability, measured before training and after every stage (retention)."""

    ppl: list[str] = Field(default_factory=list, description="Text files (.txt/.raw, or JSONL with `text`): "
                                                             "perplexity and bits per byte (lower is better).")
    mc: list[str] = Field(default_factory=list, description="Multiple-choice JSONL files (ARC / CommonsenseQA shape): "
                                                            "accuracy by log-likelihood (higher is better).")
    n: int = Field(100, ge=1, description="Multiple-choice items scored per file.")
    ppl_max_chars: int = Field(20_000, ge=100, description="Characters of each text file scored.")


class ContinualRecipe(_Strict):
    """A continual fine-tuning run: one training stage per task, every task evaluated after every stage."""

    name: str = Field("continual", description="Run name; the run directory is `<output_dir>/<name>`.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    base: Recipe = Field(default_factory=Recipe, description="The recipe every stage trains with (docs/recipe.md); "
                                                             "its `data.train`/`data.eval` are replaced by each "
                                                             "stage's.")
    stages: list[StageSpec] = Field(..., min_length=1, description="The task stream, trained in this order.")
    strategy: list[StrategyConfig] = Field(default_factory=list, description="Anti-forgetting strategies (a mapping "
                                           "or a list of them, combined in order); none = naive sequential.")
    general: GeneralEvalConfig = Field(default_factory=GeneralEvalConfig)
    joint: bool = Field(False, description="Also train one model on all stages' data at once (multi-task upper "
                                           "bound; same method, the stages' steps summed).")
    keep_checkpoints: bool = Field(False, description="Keep each stage's training checkpoints (otherwise removed "
                                                      "once the stage is evaluated and its state saved).")

    @field_validator("strategy", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        """A mapping, a bare name, or a list of either."""
        if v is None:
            return []
        v = [v] if isinstance(v, (dict, str)) else v
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _unique_names(self) -> "ContinualRecipe":
        names = [s.task_name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {dup} (set `name` on the stages)")
        return self

    @property
    def task_names(self) -> list[str]:
        return [s.task_name for s in self.stages]

    def stage_recipe(self, i: int) -> Recipe:
        """The Recipe that trains stage i: the base with this stage's data and step budget."""
        st = self.stages[i]
        data = self.base.data.model_copy(update={"train": st.train_spec(), "eval": st.eval_spec()})
        train = self.base.train.model_copy(update={k: v for k, v in (("max_steps", st.max_steps),
                                                                      ("epochs", st.epochs)) if v is not None})
        return self.base.model_copy(update={"name": f"{self.name}/{st.task_name}", "data": data, "train": train})


def validate_strategies(cr: ContinualRecipe) -> None:
    from tunelab.continual.strategies import get_strategy_class

    for i, sc in enumerate(cr.strategy):
        try:
            cls = get_strategy_class(sc.name)
        except KeyError as e:
            raise RecipeError(f"recipe field 'strategy.{i}.name': {e.args[0]}") from None
        try:
            cls.Config.model_validate(sc.options())
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, prefix=f"strategy.{i}")) from None


def parse_continual_recipe(data: dict[str, Any]) -> ContinualRecipe:
    try:
        cr = ContinualRecipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e)) from None
    try:
        validate_recipe(cr.base)
    except RecipeError as e:  # name the field from the top of this recipe
        raise RecipeError(str(e).replace("recipe field '", "recipe field 'base.")) from None
    validate_strategies(cr)
    return cr


def load_continual_recipe(path: str | Path, overrides: list[str] | None = None) -> ContinualRecipe:
    """Read, override (`strategy.0.weight=10`, `base.train.lr=1e-3`) and validate a continual recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"continual recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a continual recipe must be a mapping, got {type(data).__name__}")
    if isinstance(data.get("strategy"), (dict, str)):
        data["strategy"] = [data["strategy"]]
    if isinstance(data.get("strategy"), list) and len(data["strategy"]) == 1:
        # one strategy: `strategy.weight=10` means `strategy.0.weight=10`
        overrides = [re.sub(r"^strategy\.(?!\d+[.=])", "strategy.0.", o) for o in overrides or []]
    if overrides:
        data = _lists_from_index_maps(apply_overrides(_index_maps(data), overrides))
    return parse_continual_recipe(data)


def _index_maps(data: Any) -> Any:
    """`apply_overrides` walks mappings only: lists become {"0": item, ...} so that `stages.0.n=500` and
    `strategy.0.weight=10` address list items; `_lists_from_index_maps` turns them back."""
    if isinstance(data, dict):
        return {k: _index_maps(v) for k, v in data.items()}
    if isinstance(data, list) and data:
        return {str(i): _index_maps(v) for i, v in enumerate(data)}
    return data


def _lists_from_index_maps(data: Any) -> Any:
    if isinstance(data, dict):
        out = {k: _lists_from_index_maps(v) for k, v in data.items()}
        if out and all(isinstance(k, str) and k.isdigit() for k in out):
            return [out[k] for k in sorted(out, key=int)]
        return out
    if isinstance(data, list):
        return [_lists_from_index_maps(v) for v in data]
    return data


def continual_recipe_to_yaml(cr: ContinualRecipe) -> str:
    return yaml.safe_dump(cr.model_dump(mode="json"), sort_keys=False)


def fields_markdown() -> str:
    """Every continual-recipe field (the `base` recipe's own fields are in docs/recipe.md)."""
    rows: list[tuple[str, str, str]] = []
    for name, info in ContinualRecipe.model_fields.items():
        desc = info.description or ""
        if name == "base":
            rows.append(("base", "", desc + " Fields: docs/recipe.md."))
        elif name == "stages":
            rows.append(("stages", "required", desc))
            rows += describe_fields(StageSpec, "stages[].")
        elif name == "strategy":
            rows.append(("strategy", "[]", desc))
            rows.append(("strategy[].name", "naive", "registered strategy (`tunelab continual --strategies`); its "
                                                      "options sit beside `name` (docs/continual.md)"))
        elif name == "general":
            rows.append(("general", "", (GeneralEvalConfig.__doc__ or "").strip()))
            rows += describe_fields(GeneralEvalConfig, "general.")
        else:
            rows.append((name, yaml.safe_dump(info.default, default_flow_style=True).strip()
                         .removesuffix("...").strip(), desc))
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for path, default, desc in rows:
        d = f"`{default}`" if default not in ("", None) else ""
        lines.append(f"| `{path}` | {d} | {desc} |")
    return "\n".join(lines) + "\n"
