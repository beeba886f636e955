"""`tunelab eval`: a model, adapter, checkpoint or run, on its held-out data or a suite of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.commands._common import fail, guard, setup_logging


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        target: str = typer.Argument(..., help="A run directory, a checkpoint, an adapter dir, an HF model directory, "
                                               "a hub id, or a built-in alias."),
        task: str = typer.Option(None, "--task", help="Without --tasks: the built-in task to score (default: the run's "
                                                      "eval data, else the quickstart task; for a reward model its "
                                                      "preference pairs, date_format_pref)."),
        n: int = typer.Option(100, "--n", help="Number of held-out items (with --tasks: items per task)."),
        tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Evaluation suite, comma-separated or "
                                                  "repeated: built-in task names, gen:FILE, mc:FILE, ppl:FILE, "
                                                  "safety[:FILE], or a FILE (kind guessed). See docs/evaluation.md."),
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
        precision: Optional[str] = typer.Option(None, "--precision", help="Autocast dtype: auto, bf16, fp16 or "
                                                "fp32 (default: the recipe's train.precision, itself auto unless the "
                                                "recipe sets it: bf16 where this machine computes it natively, else "
                                                "fp32; fp16 on GPUs without bf16)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation budget of exact match "
                                                     "and generation tasks (default: the recipe's "
                                                     "eval.max_new_tokens)."),
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
        setup_logging()
        from tunelab.evaluate.targets import evaluate_target, show_results

        suite_only = {"--checker": checker != "exact", "--harmful": harmful, "--benign": benign,
                      "--refusal-detector": refusal_detector, "--ppl-max-chars": ppl_max_chars != 100_000,
                      "--ppl-window": ppl_window, "--ppl-stride": ppl_stride, "--harness-include": harness_include,
                      "--harness-limit": harness_limit}
        given = [flag for flag, value in suite_only.items() if value]
        if given and not tasks and not harness:
            fail(f"{', '.join(given)} only apply to --tasks / --harness evaluations")
        if task is not None and (tasks or harness):
            fail(f"--task picks the held-out task when there is no --tasks; add it to the suite: --tasks {task}")

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

        guard(go)
