"""The `tunelab` command line: each sub-command is a thin shell over a library function."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="tunelab: fine-tune, evaluate and export language models from one recipe.\n\n"
    "Run `tunelab run` for the quickstart (SmolLM2-135M-Instruct + LoRA on a built-in task).",
    context_settings={"help_option_names": ["-h", "--help"]},
)

OVERRIDES_HELP = "Recipe overrides as dotted keys, e.g. train.lr=1e-4 method.r=8."


def _setup_logging() -> None:
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


def _split_recipe_arg(recipe: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`tunelab run train.lr=1e-4`: a first argument with `=` that is not a file is an override of the quickstart."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *(overrides or [])]
    return recipe, list(overrides or [])


def _resolve_recipe(recipe: Optional[str]) -> Optional[str]:
    """A path, a run directory, or the name of a built-in recipe (`quickstart`)."""
    if recipe is None:
        return str(builtin_recipe_path("quickstart"))
    if not Path(recipe).exists() and (p := builtin_recipe_path(recipe)) is not None:
        return str(p)
    return recipe


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _guard(fn):
    """Turn the errors users cause (bad recipe, bad data, missing model) into a clean message."""
    from tunelab.data.formats import DataError
    from tunelab.export_gguf import GGUFExportError
    from tunelab.recipe import RecipeError
    from tunelab.train.loop import TrainingDiverged

    try:
        return fn()
    except (RecipeError, DataError, FileNotFoundError, TrainingDiverged, KeyError, GGUFExportError) as e:
        _fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


@app.command()
def run(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML, built-in recipe name, or run directory. "
                                                      "Default: the quickstart (`tunelab run train.lr=1e-4` "
                                                      "overrides it)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in its directory from the last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory of the same name."),
):
    """Evaluate, train, evaluate again, export; print the before/after table."""
    _setup_logging()
    from tunelab.runner import resolve_recipe_arg, run_recipe

    def go():
        path, extra = _split_recipe_arg(recipe, overrides)
        r, run_dir = resolve_recipe_arg(_resolve_recipe(path), extra)
        run_recipe(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)

    _guard(go)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML, built-in recipe name, or run directory (to resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in its directory from the last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory of the same name."),
):
    """Train and export, without the before/after evaluation."""
    _setup_logging()
    from tunelab.runner import resolve_recipe_arg, run_recipe

    def go():
        r, run_dir = resolve_recipe_arg(_resolve_recipe(recipe), list(overrides or []) + ["eval.before=false"])
        r.eval.after = False
        run_recipe(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)

    _guard(go)


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="A run directory, a checkpoint, an adapter dir, an HF model directory, "
                                           "a hub id, or a built-in alias."),
    task: str = typer.Option(None, "--task", help="Without --tasks: the built-in task to score (default: the run's "
                                                  "eval data, else the quickstart task)."),
    n: int = typer.Option(100, "--n", help="Number of held-out items (with --tasks: items per task)."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Evaluation suite, comma-separated or repeated: "
                                              "built-in task names, gen:FILE, mc:FILE, ppl:FILE, safety[:FILE], or a "
                                              "FILE (kind guessed). See docs/evaluation.md."),
    harness: Optional[list[str]] = typer.Option(None, "--harness", help="lm-evaluation-harness tasks, run on the "
                                                "model in memory (needs lm-eval)."),
    harness_include: Optional[str] = typer.Option(None, "--harness-include", help="Directory of lm-eval task YAML "
                                                  "files (local tasks)."),
    harness_limit: Optional[int] = typer.Option(None, "--harness-limit", help="Items per lm-eval task."),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model of a run or adapter instead of the "
                                                    "trained one (label: before)."),
    label: Optional[str] = typer.Option(None, "--label", help="Label of the results, and their file in a run "
                                        "directory: eval_suite_<label>.json with --tasks (default: after; before "
                                        "with --base), eval_<label>.json without (written only when given)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the recipe's "
                                             "eval.batch_size)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Autocast dtype: bf16, fp16 or fp32 "
                                            "(default: the recipe's train.precision)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation budget of exact match "
                                                 "and generation tasks (default: the recipe's eval.max_new_tokens)."),
    checker: str = typer.Option("exact", "--checker", help="Default checker of gen: files: exact, numeric, regex "
                                                           "or contains."),
    harmful: Optional[str] = typer.Option(None, "--harmful", help="Harmful prompts for the safety task (default: a "
                                          "shipped list)."),
    benign: Optional[str] = typer.Option(None, "--benign", help="Benign prompts for the over-refusal rate "
                                         "(default: a shipped list)."),
    refusal_detector: Optional[str] = typer.Option(None, "--refusal-detector", help="'phrases' (default) or "
                                                   "module:callable(prompt, reply) -> bool."),
    ppl_max_chars: int = typer.Option(100_000, "--ppl-max-chars", help="Characters of a ppl: file to score "
                                      "(0: all of it)."),
    ppl_window: Optional[int] = typer.Option(None, "--ppl-window", help="Perplexity window in tokens (default: the "
                                             "model's context, at most 1024)."),
    ppl_stride: Optional[int] = typer.Option(None, "--ppl-stride", help="Tokens each window advances and scores "
                                             "(default: half the window)."),
    diagnostics: bool = typer.Option(False, "--diagnostics", help="Also compute weight diagnostics of a run "
                                                                  "(trained vs base) into diagnostics.json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the results as JSON here."),
):
    """Evaluate a model, adapter, checkpoint or run: held-out loss and exact match, or a suite of tasks."""
    _setup_logging()
    from tunelab.evaluate.targets import evaluate_target, show_results

    suite_only = {"--checker": checker != "exact", "--harmful": harmful, "--benign": benign,
                  "--refusal-detector": refusal_detector, "--ppl-max-chars": ppl_max_chars != 100_000,
                  "--ppl-window": ppl_window, "--ppl-stride": ppl_stride, "--harness-include": harness_include,
                  "--harness-limit": harness_limit}
    given = [flag for flag, value in suite_only.items() if value]
    if given and not tasks and not harness:
        _fail(f"{', '.join(given)} only apply to --tasks / --harness evaluations")
    if task is not None and (tasks or harness):
        _fail(f"--task picks the held-out task when there is no --tasks; add it to the suite: --tasks {task}")

    def go():
        results = evaluate_target(
            target, task=task, n=n, tasks=tasks, harness=harness, harness_include=harness_include,
            harness_limit=harness_limit, base=base, label=label, batch_size=batch_size, precision=precision,
            max_new_tokens=max_new_tokens, checker=checker, harmful=harmful, benign=benign,
            refusal_detector=refusal_detector, ppl_max_chars=ppl_max_chars, ppl_max_length=ppl_window,
            ppl_stride=ppl_stride, diagnostics=diagnostics)
        code = show_results(results, output, echo=typer.echo)
        if code:
            raise typer.Exit(code)

    _guard(go)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory with a checkpoint."),
    adapter: bool = typer.Option(True, "--adapter/--no-adapter", help="Write the method's adapter (PEFT format for "
                                                                     "PEFT methods; see docs/methods.md)."),
    merged: bool = typer.Option(True, "--merged/--no-merged", help="Write the merged HF model."),
    gguf: bool = typer.Option(False, "--gguf", help="Also write the merged model as GGUF (llama.cpp, Ollama, LM "
                              "Studio) with an Ollama Modelfile, under <run>/export/gguf/."),
    quant: Optional[list[str]] = typer.Option(None, "--quant", help="GGUF quantisation, repeatable: f16 (default), "
                                              "q8_0, q4_0, bf16, f32. Implies --gguf."),
):
    """Export a run's latest checkpoint: the method's adapter, the merged model (HF format), GGUF (--gguf)."""
    _setup_logging()
    from tunelab.export import export_run

    quants = list(quant or []) or (["f16"] if gguf else [])
    _guard(lambda: export_run(run_dir, adapter=adapter, merged=merged or bool(quants), gguf=quants))


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
    _setup_logging()
    from tunelab.methods.registry import list_methods

    if name is not None and (count or markdown):
        _fail("give a method NAME, or --count RECIPE, or --markdown")
    if name is not None:
        from tunelab.methods._catalog import method_options_text

        _guard(lambda: typer.echo(method_options_text(name)))
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
        r = load_validated_recipe(_resolve_recipe(count))
        prepared, _ = assemble(r)  # calibrated on the training data where the method needs it
        trainable, total = prepared.params["trainable_params"], prepared.params["total_params"]
        typer.echo(f"{r.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")

    _guard(go)


@app.command()
def objectives():
    """List the registered training objectives (what is minimised) with their papers."""
    from tunelab.objectives.base import list_objectives

    for name, cls in list_objectives().items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<14} {cls.paper or '-':<36} {doc}")


@app.command("recipe")
def recipe_cmd(
    show: Optional[str] = typer.Argument(None, help="A recipe to validate and print resolved (default: list the fields)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
):
    """List every recipe field with its default and meaning, or print a recipe resolved."""
    from tunelab.recipe import fields_markdown, recipe_to_yaml
    from tunelab.validate import load_validated_recipe

    if show is None:
        typer.echo(fields_markdown())
        return
    _guard(lambda: typer.echo(recipe_to_yaml(load_validated_recipe(_resolve_recipe(show), overrides or []))))


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


def _register_plugins() -> None:
    from tunelab.commands import register_all

    register_all(app)


_register_plugins()

if __name__ == "__main__":
    app()
