"""`tunelab report RUN_DIR... -o report.html`: one self-contained HTML page comparing runs."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare."),
        output: Path = typer.Option(Path("report.html"), "-o", "--output", help="Where to write the HTML page."),
        title: str = typer.Option("tunelab report", "--title", help="Page title."),
        diagnostics: bool = typer.Option(False, "--diagnostics", help="Compute weight diagnostics (export vs base) "
                                                                       "for runs that have none yet."),
        screenshot: Path = typer.Option(None, "--screenshot", help="Also save a PNG of the page (headless "
                                                                   "Chromium)."),
    ):
        """Compare runs side by side: scores before/after, general ability, safety, memory, speed, plots."""
        from tunelab.track.report import write_report

        missing = [str(p) for p in run_dirs if not p.is_dir()]
        if missing:
            typer.secho(f"error: not a directory: {', '.join(missing)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        if diagnostics:
            from tunelab.evaluate.diagnostics import diagnose_run

            for p in run_dirs:
                if not (p / "diagnostics.json").is_file() and (p / "recipe.yaml").is_file():
                    try:
                        diagnose_run(p)
                    except (FileNotFoundError, ValueError) as e:
                        typer.secho(f"warning: {p}: no diagnostics ({e})", fg=typer.colors.YELLOW, err=True)
        path = write_report(list(run_dirs), output, title)
        typer.echo(f"report: {path}")
        if screenshot is not None:
            from tunelab.track.report import open_in_chromium

            try:
                open_in_chromium(path, screenshot=screenshot)
            except (FileNotFoundError, RuntimeError) as e:
                typer.secho(f"error: screenshot: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1) from None
            typer.echo(f"screenshot: {screenshot}")
