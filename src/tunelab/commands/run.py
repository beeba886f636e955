"""`tunelab run` (evaluate, train, evaluate, export) and `tunelab train` (train and export)."""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.commands._common import OVERRIDES_HELP, guard, resolve_recipe, setup_logging, split_recipe_arg


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        recipe: Optional[str] = typer.Argument(None, help="Recipe YAML, built-in recipe name, or run directory. "
                                                          "Default: the quickstart (`tunelab run train.lr=1e-4` "
                                                          "overrides it)."),
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        resume: bool = typer.Option(False, "--resume",
                                    help="Continue the run in its directory from the last checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace an existing run directory of the same name."),
    ):
        """Evaluate, train, evaluate again, export; print the before/after table. A recipe with an `iterate:`
        section runs its self-improvement rounds (as `tunelab iterate`)."""
        setup_logging()
        from tunelab.runner import resolve_recipe_arg, run_recipe

        def go():
            path, extra = split_recipe_arg(recipe, overrides)
            r, run_dir = resolve_recipe_arg(resolve_recipe(path), extra)
            if r.iterate is not None:  # self-improvement rounds: `tunelab iterate` (docs/iterate.md)
                from tunelab.iterate import run_iterate

                run_iterate(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)
                return
            run_recipe(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)

        guard(go)


    @app.command()
    def train(
        recipe: str = typer.Argument(..., help="Recipe YAML, built-in recipe name, or run directory (to resume)."),
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        resume: bool = typer.Option(False, "--resume",
                                    help="Continue the run in its directory from the last checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace an existing run directory of the same name."),
    ):
        """Train and export, without the before/after evaluation."""
        setup_logging()
        from tunelab.runner import resolve_recipe_arg, run_recipe

        def go():
            r, run_dir = resolve_recipe_arg(resolve_recipe(recipe), list(overrides or []) + ["eval.before=false"])
            r.eval.after = False
            run_recipe(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)

        guard(go)
