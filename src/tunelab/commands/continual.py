"""`tunelab continual RECIPE.yaml`: continual fine-tuning over a stream of tasks (docs/continual.md).

A thin shell over :func:`tunelab.continual.stream.run_continual`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Fine-tune on a stream of tasks, one stage per task; evaluate every task after every stage.

\b
Recipe (docs/continual.md has every field and strategy):
  name: cl-lora
  base:                         # an ordinary recipe minus its data
    method: {name: lora, r: 16}
    train: {max_steps: 60, lr: 1.0e-3}
  stages:
    - {builtin: date_format}
    - {builtin: arithmetic}
    - {name: mine, train: {path: t.jsonl}, eval: {path: d.jsonl}}
  strategy: {name: ewc, weight: 1000}   # or a list; none = naive
  general: {ppl: [wiki.test.raw], mc: [arc.jsonl]}
  joint: true                   # also the multi-task upper bound

\b
Strategies: naive, replay, gere, ewc, l2, lwf, olora, ilora,
hft, lines (`--strategies` lists them with their papers).
Writes continual/r_matrix.json (R matrix, ACC, BWT, FWT, forgetting,
general retention), drawn by `tunelab report`. A run directory
(or --resume) continues after the last completed stage.
"""


def register(app: typer.Typer) -> None:
    @app.command(help=HELP)
    def continual(
        recipe: Optional[str] = typer.Argument(None, help="Continual recipe YAML, built-in recipe name "
                                                          "(continual_lora), or a run directory (resumes it)."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as dotted keys, e.g. "
                                                        "base.train.lr=1e-3 stages.0.n=500 strategy.0.weight=10.",
                                                        show_default=False),
        resume: bool = typer.Option(False, "--resume", help="Continue the run after its last completed stage."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory of the same "
                                                                  "name."),
        fields: bool = typer.Option(False, "--fields", help="List every continual-recipe field and exit."),
        strategies: bool = typer.Option(False, "--strategies", help="List the strategies with their papers and "
                                                                    "exit."),
    ):
        from tunelab.commands._common import fail, guard, resolve_recipe, setup_logging

        if fields:
            from tunelab.continual.recipe import fields_markdown

            typer.echo(fields_markdown())
            return
        if strategies:
            import sys

            from tunelab.continual.strategies import list_strategies

            for name, cls in list_strategies().items():
                doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
                typer.echo(f"{name:<8} {cls.paper or '-':<34} {doc}")
            return
        if recipe is None:
            fail("give a continual recipe (e.g. `tunelab continual continual_lora`) or a run directory")
        setup_logging()

        def go():
            from tunelab.continual.evaluation import ContinualError
            from tunelab.continual.recipe import load_continual_recipe
            from tunelab.continual.stream import run_continual

            target = Path(recipe)
            run_dir = None
            if target.is_dir():
                if not (target / "continual.yaml").is_file():
                    fail(f"{target} is a directory without a continual.yaml: not a continual run directory")
                cr, run_dir = load_continual_recipe(target / "continual.yaml", overrides or []), target
            else:
                cr = load_continual_recipe(resolve_recipe(recipe), overrides or [])
            try:
                run_continual(cr, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)
            except ContinualError as e:
                fail(str(e))

        guard(go)
