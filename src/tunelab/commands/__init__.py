"""The sub-commands of `tunelab`: one module each, defining `register(app: typer.Typer) -> None`.

`register_all` adds the main path's commands first (in the order `tunelab --help` lists them), then every other
module of this package by name, so a feature (merge, select, continual, report, ...) brings its CLI as one new
file without editing `tunelab/cli.py`. Keep top-level imports light (torch/transformers inside the commands);
shared helpers (`guard`, `fail`, recipe arguments) are in `_common.py`.
"""

from __future__ import annotations

import importlib
import pkgutil

FIRST = ("run", "evaluate", "export", "catalog", "recipe")  # the main path, in the order the help shows it


def register_all(app) -> None:
    import tunelab.commands as pkg

    others = sorted(i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_"))
    for name in [*FIRST, *(n for n in others if n not in FIRST)]:
        importlib.import_module(f"tunelab.commands.{name}").register(app)
