"""`tunelab iterate RECIPE`: self-improvement rounds (docs/iterate.md). A thin shell over
:func:`tunelab.iterate.run_iterate`."""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.commands._common import OVERRIDES_HELP, guard, resolve_recipe, setup_logging

HELP = """Improve a model with its own samples, round after round: sample, score, keep or pair, train.

\b
A recipe with an `iterate:` section (docs/iterate.md has every field):
  iterate:
    strategy: raft        # raft | rest_em | iterative_dpo | spin | self_rewarding | star
    rounds: 3
    num_generations: 8    # samples per prompt
    prompts_per_round: 64
    rewards: [{name: task}, {name: regex, pattern: '\\d{4}-\\d{2}-\\d{2}', weight: 0.5}]
    selection: best_of_k  # threshold | top_fraction | correct_only (SFT strategies)
    continue_from: previous   # or base (ReST-EM, STaR default)
    on_empty_round: stop      # or skip

\b
Shipped: raft, iterative_dpo, spin, self_rewarding (`tunelab iterate raft`).
Each round writes round-N/samples.jsonl, data.jsonl (trainable with
`tunelab run`), run/ (the round's training run) and DONE; the per-round
table is printed and saved in summary.json. A run directory (or --resume)
continues: finished rounds are never recomputed.
"""


def register(app: typer.Typer) -> None:
    @app.command(help=HELP)
    def iterate(
        recipe: str = typer.Argument(..., help="Recipe YAML with an `iterate:` section, a shipped recipe's name, "
                                               "or an iterate run directory (resumes it)."),
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP + " iterate.rounds=5",
                                                        show_default=False),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in its directory: finished rounds "
                                                            "are read back, an unfinished one resumes."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory of the same "
                                                                  "name."),
    ):
        setup_logging()

        def go():
            from tunelab.iterate import run_iterate
            from tunelab.runner import resolve_recipe_arg

            r, run_dir = resolve_recipe_arg(resolve_recipe(recipe), list(overrides or []))
            run_iterate(r, run_dir=run_dir, overwrite=overwrite, resume=resume or run_dir is not None)

        guard(go)

