"""The launch form, generated from the recipe schema, and the validation every launch goes through.

Fields come from `tunelab.recipe.describe_fields` (dotted path, default, meaning) with the widget chosen from the
pydantic annotation; each method's and objective's options from its registered `Config` (`methods._catalog`'s
rows). The form posts the fields a user changed as `a.b.c=value` overrides, which `tunelab.validate.
load_validated_recipe` parses exactly as the CLI does; a recipe typed or pasted as YAML goes through the same
function. Errors come back per dotted field (`recipe field 'train.lr': ...`), so the page shows each at its input.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunelab.recipe import MethodConfig, ObjectiveConfig, Recipe, RecipeError, describe_fields, recipe_to_yaml

FIELD_ERROR = re.compile(r"recipe field '([^']+)': (.*)")


def _union_args(annotation: Any) -> tuple[Any, ...]:
    """The members of `X | Y` / `Optional[X]`; (annotation,) for anything else (`list[X]` is one type, not X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


def field_info(path: str):
    """The pydantic FieldInfo of a dotted recipe field (None for method/objective options)."""
    model: type[BaseModel] = Recipe
    *parents, last = path.split(".")
    for part in parents:
        info = model.model_fields.get(part)
        models = _models_in(info.annotation) if info is not None else []
        if not models or models[0] in (MethodConfig, ObjectiveConfig):
            return None
        model = models[0]
    return model.model_fields.get(last)


def widget(annotation: Any) -> dict[str, Any]:
    """How a value of this type is typed in: checkbox, number, select (a Literal), text, or yaml (anything else)."""
    args = _union_args(annotation)
    nullable = type(None) in args
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        a = inner[0]
        if typing.get_origin(a) is typing.Literal:
            return {"widget": "select", "choices": [str(v) for v in typing.get_args(a)], "nullable": nullable}
        if a is bool:
            return {"widget": "checkbox", "nullable": nullable}
        if a in (int, float):
            return {"widget": "number", "step": "1" if a is int else "any", "nullable": nullable}
        if a is str:
            return {"widget": "text", "nullable": nullable}
    return {"widget": "yaml", "nullable": nullable}


def recipe_fields() -> list[dict[str, Any]]:
    """Every recipe field in the order `tunelab recipe` lists them; section rows carry `section: true`."""
    rows = []
    for path, default, desc in describe_fields():
        if path in ("method.name", "objective.name"):
            continue  # the class pickers: the form draws them with their options
        info = field_info(path)
        if info is None or (default == "" and _models_in(info.annotation) and path.count(".") < 2) \
                or default == "see below":
            rows.append({"path": path, "section": True, "description": desc})
            continue
        rows.append({"path": path, "default": default, "description": desc, **widget(info.annotation)})
    return rows


def class_options(cls: type) -> list[dict[str, Any]]:
    from pydantic_core import to_jsonable_python

    from tunelab.methods._catalog import default_of, type_name

    return [{"path": name, "type": type_name(info.annotation), "default": default_of(info),
             "value": to_jsonable_python(info.get_default(call_default_factory=True)),
             "description": info.description or "", **widget(info.annotation)}
            for name, info in cls.Config.model_fields.items()]


def first_line(cls: type) -> str:
    import sys

    return ((cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines() or [""])[0]


def catalogue() -> dict[str, Any]:
    """Methods and objectives with papers and options (the launch form and the Methods page)."""
    from tunelab.methods.registry import list_methods
    from tunelab.objectives.base import list_objectives

    methods = {name: {"paper": cls.paper, "doc": first_line(cls), "trains": cls.trains,
                      "mergeable": cls.mergeable, "adapter_format": cls.adapter_format,
                      "options": class_options(cls)} for name, cls in list_methods().items()}
    objectives = {name: {"paper": cls.paper, "doc": first_line(cls), "options": class_options(cls)}
                  for name, cls in list_objectives().items()}
    return {"methods": methods, "objectives": objectives,
            "defaults": {"method": MethodConfig().name, "objective": ObjectiveConfig().name}}


def field_errors(err: Exception) -> list[dict[str, Any]]:
    """`recipe field 'x.y': message` lines as [{field, message}]; other lines with field None."""
    out = []
    for line in str(err).splitlines():
        m = FIELD_ERROR.match(line.strip())
        out.append({"field": m.group(1), "message": m.group(2)} if m else {"field": None, "message": line})
    return out or [{"field": None, "message": type(err).__name__}]


def validate_overrides(overrides: list[str]) -> tuple[Recipe | None, list[dict[str, Any]]]:
    """The form's values (`a.b=value` as the CLI takes them) on the default recipe, validated. The defaults are
    written out resolved first, so that `data.train.n=64` changes the default training set's size instead of
    replacing the whole (default-built) `data.train` section with `{n: 64}`."""
    import tempfile

    from tunelab.validate import load_validated_recipe

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tunelab-board-") as f:
        f.write(recipe_to_yaml(Recipe()))
        f.flush()
        try:
            recipe = load_validated_recipe(f.name, overrides)
            return recipe, []
        except (RecipeError, KeyError) as e:
            return None, field_errors(e)


def validate_yaml_file(path: Path) -> tuple[Recipe | None, list[dict[str, Any]]]:
    from tunelab.validate import load_validated_recipe

    try:
        recipe = load_validated_recipe(path)
        return recipe, []
    except (RecipeError, KeyError) as e:
        return None, field_errors(e)


def shipped_recipes() -> dict[str, str]:
    """The built-in recipes `tunelab run` can start (continual, merge and sweep recipes are other commands')."""
    from importlib import resources

    from tunelab.validate import load_validated_recipe

    out = {}
    folder = resources.files("tunelab") / "recipes"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            try:
                load_validated_recipe(Path(str(entry)))
            except (RecipeError, KeyError):
                continue
            out[entry.name.removesuffix(".yaml")] = entry.read_text()
    return out


def resolved_yaml(recipe: Recipe) -> str:
    return recipe_to_yaml(recipe)
