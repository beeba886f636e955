"""What every command shares: logging set-up, recipe arguments (a file, a run directory or a shipped recipe's
name, with dotted overrides) and `guard`, which turns the errors users cause into one clean line."""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

OVERRIDES_HELP = "Recipe overrides as dotted keys, e.g. train.lr=1e-4 method.r=8."


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # deprecation notices of our dependencies are for us, not for users of the CLI
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torchao / bitsandbytes (QLoRA, 8-bit optimizers) log harmless kernel-loading failures on CPU at import
    for noisy in ("transformers", "accelerate", "datasets", "peft", "httpx", "urllib3", "torchao", "bitsandbytes",
                  "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def builtin_recipe_path(name: str) -> Path | None:
    candidate = resources.files("tunelab") / "recipes" / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None


def split_recipe_arg(recipe: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`tunelab run train.lr=1e-4`: a first argument with `=` that is not a file is an override of the quickstart."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *(overrides or [])]
    return recipe, list(overrides or [])


def resolve_recipe(recipe: Optional[str]) -> Optional[str]:
    """A path, a run directory, or the name of a built-in recipe (`quickstart`)."""
    if recipe is None:
        return str(builtin_recipe_path("quickstart"))
    if not Path(recipe).exists() and (p := builtin_recipe_path(recipe)) is not None:
        return str(p)
    return recipe


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions users cause (bad recipe, data, model, run directory, checkpoint); each carries a message
    that names the file, field or line. Anything else is a bug and keeps its traceback."""
    from tunelab.continual.evaluation import ContinualError
    from tunelab.continual.strategies.base import StrategyError
    from tunelab.core.registry import UnknownName
    from tunelab.core.rundir import RunDirError
    from tunelab.data.formats import DataError
    from tunelab.export_gguf import GGUFExportError
    from tunelab.methods.registry import ExportUnsupported
    from tunelab.model import ModelError
    from tunelab.recipe import RecipeError
    from tunelab.train.checkpoint import CheckpointError
    from tunelab.train.loop import TrainingDiverged

    return (RecipeError, DataError, ModelError, RunDirError, CheckpointError, ContinualError, StrategyError,
            UnknownName, TrainingDiverged, ExportUnsupported, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, GGUFExportError)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:  # str() of a KeyError is the repr of its message
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # "[Errno 13] ..." -> "path: reason"
        return f"{e.filename}: {e.strerror}"
    return str(e)


def guard(fn):
    """Run one command: the errors users cause become one `error:` line (exit 2), and a failure leaves nothing
    behind (locks released, a run directory created by this command removed if no step was taken; see
    core/rundir.invocation). Set TUNELAB_DEBUG=1 to see the traceback instead."""
    from tunelab.core.rundir import invocation

    try:
        with invocation():
            return fn()
    except _user_errors() as e:
        if os.environ.get("TUNELAB_DEBUG"):
            raise
        fail(_message(e))
