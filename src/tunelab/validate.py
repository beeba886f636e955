"""Recipe checks that need the plug-in registries: the layer above methods, objectives and selection.

`tunelab.recipe` validates shapes only (it imports nothing of tunelab but itself); the options of the
registered method, objective and selection scorer/selector are checked here against their own `Config`
classes, each error naming the dotted recipe field. Commands load recipes with `load_validated_recipe`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tunelab.core.registry import UnknownName
from tunelab.methods.registry import get_method_class
from tunelab.objectives.base import get_objective_class
from tunelab.recipe import Recipe, RecipeError, format_validation_error, load_recipe
from tunelab.selection.registry import validate_select_config


def validate_recipe(recipe: Recipe) -> Recipe:
    """Check `method`, `objective` and `data.select` options against their registered classes."""
    for section, getter, name, options in (
        ("method", get_method_class, recipe.method.name, recipe.method_options()),
        ("objective", get_objective_class, recipe.objective.name, recipe.objective_options()),
    ):
        try:
            cls = getter(name)
        except UnknownName as e:
            raise RecipeError(f"recipe field '{section}.name': {e}") from None
        try:
            cls.Config.model_validate(options)
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, prefix=section)) from None
    if recipe.data.select is not None:
        try:
            validate_select_config(recipe.data.select)
        except ValueError as e:
            raise RecipeError(f"recipe field 'data.select': {e}") from None
    return recipe


def load_validated_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """`tunelab.recipe.load_recipe` (YAML, overrides, shape) and then `validate_recipe`."""
    return validate_recipe(load_recipe(path, overrides))
