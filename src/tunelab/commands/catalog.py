"""The catalogue: `tunelab methods` (with a method's options, or a recipe's trainable-parameter count), `tunelab
objectives`, `tunelab rewards`, `tunelab tasks`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from tunelab.commands._common import fail, guard, resolve_recipe, setup_logging


def register(app: typer.Typer) -> None:
    @app.command()
    def methods(
        name: Optional[str] = typer.Argument(None, help="A method: print its options with their defaults and meaning."),
        count: Optional[str] = typer.Option(None, "--count", help="Recipe whose model and method to count "
                                                                 "trainable parameters for."),
        markdown: bool = typer.Option(False, "--markdown", help="Print docs/methods.md's generated parts: the table "
                                                                "(paper, what trains, mergeable, export formats) and "
                                                                "every method's options."),
    ):
        """List the registered fine-tuning methods with their papers, show one method's options (`tunelab methods
        lora`), or count a recipe's trainable parameters."""
        setup_logging()
        from tunelab.methods.registry import list_methods

        if name is not None and (count or markdown):
            fail("give a method NAME, or --count RECIPE, or --markdown")
        if name is not None:
            from tunelab.methods._catalog import method_options_text

            guard(lambda: typer.echo(method_options_text(name)))
            return
        if markdown:
            from tunelab.methods._catalog import methods_markdown, options_markdown

            typer.echo(methods_markdown())
            typer.echo("")
            typer.echo(options_markdown())
            return
        if count is None:
            for name, cls in list_methods().items():
                doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
                typer.echo(f"{name:<14} {cls.paper or '-':<36} {doc}")
            return
        from tunelab.assemble import assemble
        from tunelab.validate import load_validated_recipe

        def go():
            r = load_validated_recipe(resolve_recipe(count))
            prepared, _ = assemble(r)  # calibrated on the training data where the method needs it
            trainable, total = prepared.params["trainable_params"], prepared.params["total_params"]
            typer.echo(f"{r.method.name}: {trainable:,} trainable of {total:,} parameters "
                       f"({100 * trainable / total:.4f}%)")

        guard(go)


    @app.command()
    def objectives():
        """List the registered training objectives (what is minimised) with their papers."""
        from tunelab.objectives.base import list_objectives

        for name, cls in list_objectives().items():
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            typer.echo(f"{name:<14} {cls.paper or '-':<36} {doc}")

    @app.command()
    def rewards():
        """List the registered rewards of on-line RL (verifiers, format, length, functions, judges, reward models)."""
        from tunelab.rewards.base import list_rewards

        for name, cls in list_rewards().items():
            kind = "verifier" if cls.verifier else ""
            typer.echo(f"{name:<14} {kind:<9} {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")

    @app.command()
    def tasks():
        """List the built-in tasks (generators with answer checkers)."""
        from tunelab.data.builtin import list_tasks
        from tunelab.data.builtin.base import generate

        width = max(len(t.name) for t in list_tasks())
        skill_width = max(len(t.skill) for t in list_tasks())
        for t in list_tasks():
            ex = generate(t, "eval", 1, 0)[0]
            rejected = f" (rejected: {ex.rejected!r})" if getattr(ex, "rejected", None) else ""
            typer.echo(f"{t.name:<{width}} {t.skill:<{skill_width}} e.g. {ex.prompt!r} -> {ex.answer!r}{rejected}")
