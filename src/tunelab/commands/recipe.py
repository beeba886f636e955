"""`tunelab recipe`: every recipe field with its default and meaning, or one recipe validated and resolved."""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.commands._common import OVERRIDES_HELP, guard, resolve_recipe


def register(app: typer.Typer) -> None:
    @app.command("recipe")
    def recipe_cmd(
        show: Optional[str] = typer.Argument(
            None, help="A recipe to validate and print resolved (default: list the fields)."),
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    ):
        """List every recipe field with its default and meaning, or print a recipe resolved."""
        from tunelab.recipe import fields_markdown, recipe_to_yaml
        from tunelab.validate import load_validated_recipe

        if show is None:
            typer.echo(fields_markdown())
            return
        guard(lambda: typer.echo(recipe_to_yaml(load_validated_recipe(resolve_recipe(show), overrides or []))))
