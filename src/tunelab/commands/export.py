"""`tunelab export`: a run's latest checkpoint as a PEFT adapter and a merged HF model."""

from __future__ import annotations

from pathlib import Path

import typer

from tunelab.commands._common import guard, setup_logging


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        run_dir: Path = typer.Argument(..., help="A run directory with a checkpoint."),
        adapter: bool = typer.Option(True, "--adapter/--no-adapter", help="Write the method's adapter (PEFT format for "
                                                                         "PEFT methods; see docs/methods.md)."),
        merged: bool = typer.Option(True, "--merged/--no-merged", help="Write the merged HF model."),
    ):
        """Export a run's latest checkpoint: the method's adapter and the merged model (HF format)."""
        setup_logging()
        from tunelab.export import export_run

        guard(lambda: export_run(run_dir, adapter=adapter, merged=merged))
