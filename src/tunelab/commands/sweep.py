"""`tunelab sweep`: a multi-objective hyper-parameter and method search with Optuna (docs/sweep.md).

A thin shell over :func:`tunelab.sweep.study.run_sweep` and :func:`tunelab.sweep.results.write_best_recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Search methods and hyper-parameters with Optuna; each trial is an ordinary run.

\b
  tunelab sweep sweep_quickstart                       # a sweep recipe (base + space + objectives)
  tunelab sweep recipe.yaml --space space.yaml --trials 20 \\
      --objective eval.exact_match:max --objective train.peak_memory_mb:min
  tunelab sweep runs/sweep-quickstart --resume         # continue, or join as another worker
  tunelab sweep runs/sweep-quickstart --best           # write the winning recipe

\b
Space (space.yaml, or `space:` in a sweep recipe):
  train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
  method:                       # the method is categorical,
    lora: {r: {choices: [4, 8, 16]}}   # its options exist only under it
    ia3: {}

\b
Objectives: eval.KEY, before.KEY, train.KEY (peak_memory_mb, wall_time_s,
...), suite.TASK, forgetting; each :max or :min. One objective: TPE (and
pruning, with --pruner); several: NSGA-II and the Pareto front. The study
is a SQLite file in the sweep directory unless --storage names another.
"""


def register(app: typer.Typer) -> None:
    @app.command(help=HELP)
    def sweep(
        recipe: Optional[str] = typer.Argument(None, help="Sweep recipe YAML, built-in name (sweep_quickstart), an "
                                                          "ordinary recipe (with --space), or a sweep directory."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as dotted keys: of the sweep recipe "
                                                        "(trials=4 base.train.lr=1e-3), or of an ordinary recipe.",
                                                        show_default=False),
        space: Optional[Path] = typer.Option(None, "--space", help="Search space YAML (replaces the recipe's)."),
        trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Total trials of the study."),
        objective: Optional[list[str]] = typer.Option(None, "--objective", help="METRIC:max or METRIC:min; repeat "
                                                      "for several objectives (replaces the recipe's)."),
        pruner: Optional[str] = typer.Option(None, "--pruner", help="none, median, percentile, hyperband or "
                                             "threshold (one objective only)."),
        storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (sqlite:///, "
                                              "postgresql://, mysql://) or journal:PATH; default: SQLite in the "
                                              "sweep directory."),
        study: Optional[str] = typer.Option(None, "--study", help="Study name in the storage (default: the "
                                            "sweep's name)."),
        name: Optional[str] = typer.Option(None, "--name", help="Sweep name (its directory under output_dir)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the study, or join it as another worker."),
        best: bool = typer.Option(False, "--best", help="Write the winning trial's recipe and exit."),
        trial: Optional[int] = typer.Option(None, "--trial", help="With --best: this trial instead of the winner."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="With --best: where to write the recipe "
                                              "(default: <sweep dir>/best_recipe.yaml)."),
    ):
        from tunelab.commands._common import fail, guard, resolve_recipe, setup_logging

        setup_logging()
        target = Path(recipe) if recipe else None
        is_sweep_dir = target is not None and target.is_dir()
        if is_sweep_dir and not (target / "sweep.yaml").is_file():
            fail(f"{target} is a directory without a sweep.yaml: not a sweep directory")
        if (trial is not None or output is not None) and not best:
            fail("--trial and --output go with --best")

        def go():
            from tunelab.sweep.results import write_best_recipe
            from tunelab.sweep.spec import load_sweep
            from tunelab.sweep.study import run_sweep

            if best:
                if not is_sweep_dir:
                    fail("--best reads a sweep directory: tunelab sweep runs/NAME --best")
                path, chosen = write_best_recipe(target, output, trial)
                values = ", ".join(f"{k} = {v:.4g}" for k, v in chosen["values"].items())
                typer.echo(f"trial {chosen['number']} ({values}): {path}")
                return
            if recipe is None:
                fail("give a sweep recipe (e.g. `tunelab sweep sweep_quickstart`), a recipe with --space, or a "
                      "sweep directory with --resume")
            if is_sweep_dir and not resume:
                fail(f"{target} is a sweep directory: --resume continues it, --best writes its winning recipe")
            source = target / "sweep.yaml" if is_sweep_dir else resolve_recipe(recipe)
            sr = load_sweep(source, list(overrides or []), space=space, objectives=objective, trials=trials,
                            storage=storage, study_name=study, name=name, pruner=pruner)
            summary = run_sweep(sr, resume=resume, echo=typer.echo)
            show_summary(summary)

        guard(go)


def show_summary(summary: dict) -> None:
    n = summary["trials"]
    typer.echo(f"\n{n['total']} trials: {n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed"
               + (f", {n['running']} running elsewhere" if n["running"] else ""))
    specs = summary["objectives"]
    typer.echo("Pareto front:" if len(specs) > 1 else "best trial:")
    for t in summary["best"]:
        values = ", ".join(f"{s} = {t['values'][s]:.4g}" for s in specs)
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        typer.echo(f"  trial {t['number']}: {values}  [{params}]  {t['run_dir']}")
    wall = summary.get("wall_time_s")
    typer.echo((f"wall time {wall:.0f} s; " if wall is not None else "")
               + f"summary.json and report.html in {summary['sweep_dir']}")
