"""`tunelab export`: a run's latest checkpoint as a PEFT adapter, a merged HF model and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.commands._common import guard, setup_logging


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        run_dir: Path = typer.Argument(..., help="A run directory with a checkpoint."),
        adapter: bool = typer.Option(True, "--adapter/--no-adapter", help="Write the method's adapter (PEFT format for "
                                                                         "PEFT methods; see docs/methods.md)."),
        merged: bool = typer.Option(True, "--merged/--no-merged", help="Write the merged HF model (a reward model: "
                                                                    "sequence classification)."),
        gguf: bool = typer.Option(False, "--gguf", help="Also write the merged model as GGUF (llama.cpp, Ollama, LM "
                                  "Studio) with an Ollama Modelfile, under <run>/export/gguf/."),
        quant: Optional[list[str]] = typer.Option(None, "--quant", help="GGUF quantisation, repeatable: f16 (default), "
                                                  "q8_0, q4_0, bf16, f32. Implies --gguf."),
    ):
        """Export a run's latest checkpoint: the method's adapter, the merged model (HF format), GGUF (--gguf)."""
        setup_logging()
        from tunelab.export import export_run

        quants = list(quant or []) or (["f16"] if gguf else [])
        guard(lambda: export_run(run_dir, adapter=adapter, merged=merged or bool(quants), gguf=quants))
