"""The `tunelab` command line: the Typer app. Every sub-command lives in `tunelab.commands` (one module each, a
thin shell over a library function) and is added by `commands.register_all`."""

from __future__ import annotations

import typer

from tunelab.commands import register_all

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="tunelab: fine-tune, evaluate and export language models from one recipe.\n\n"
    "Run `tunelab run` for the quickstart (SmolLM2-135M-Instruct + LoRA on a built-in task).",
    context_settings={"help_option_names": ["-h", "--help"]},
)

register_all(app)

if __name__ == "__main__":
    app()
