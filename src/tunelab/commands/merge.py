"""`tunelab merge RECIPE.yaml -o OUT_DIR`: weight-space merging, delta compression and LoRA merging.

A thin shell over :func:`tunelab.merging.run.run_merge`; the recipe format is documented in
docs/merging.md and :mod:`tunelab.merging.recipe`.
"""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Merge fine-tunes in weight space from a mergekit-shaped YAML recipe.

\b
Recipe (docs/merging.md has every method and parameter):
  merge_method: ties
  base_model: smollm2-135m-instruct   # HF dir, alias or run dir
  models:
    - model: runs/date                # a tunelab run dir,
      parameters: {weight: 1.0, density: 0.5}
    - model: runs/arith/export/adapter  # a PEFT LoRA adapter,
    - model: ./other-finetune         # or an HF checkpoint dir
  parameters: {lambda: 1.0}
  dtype: bfloat16                     # default: the base's dtype

\b
Methods writing an HF checkpoint (AutoModelForCausalLM loads it):
  linear, task_arithmetic, ties, dare_linear, dare_ties, slerp,
  wise_ft, model_stock, lines, transfer, greedy_soup;
  bitdelta, svd_delta (rank): compress ONE fine-tune's delta vs
  base_model, write base + reconstruction, print the ratio;
  bitdelta --calibration TEXT: then distil the per-matrix scales
  against the fine-tuned model (BitDelta's second stage).
Methods writing a PEFT adapter (PeftModel.from_pretrained loads it):
  lora_linear, lora_cat, lora_svd (rank); inputs must be adapters.

\b
greedy_soup, and wise_ft with `alphas`, choose by a held-out score:
  parameters: {score_task: date_format, score_n: 50}
  score_task may be a list (averaged); score_metric: exact_match
  (default) or loss (minus held-out loss); score_seed: other items.

\b
mergekit's own configs run unchanged: per-layer gradients
(density: [1, 0.5, 0.1]), filters (weight: [{filter: mlp,
value: 0.5}, {value: 1}]), slices with layer_range (passthrough
frankenmerges), tokenizer_source, normalize / rescale / int8_mask
(mergekit's conventions; `convention: peft` for peft's TIES/DARE).

\b
A run dir stands for <run>/export/merged or <run>/export/adapter
(the adapter first for the LoRA-level methods). Inputs are checked
(architecture, tensor names, shapes) before anything is merged;
on any error nothing is written.
"""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _print_report(report: dict, out: Path) -> None:
    echo = typer.echo
    c = report.get("compression")
    if c:
        what = "BitDelta (1 bit + 1 scale per matrix)" if c["method"] == "bitdelta" else f"SVD rank {c['rank']}"
        echo(f"{what}: {c['compressed']} matrices compressed, {c['kept_dense']} tensors kept dense, "
             f"{c['unchanged']} unchanged")
        echo(f"delta stored in {_fmt_bytes(c['stored_bytes'])} of {_fmt_bytes(c['dense_bytes'])} dense: "
             f"compression ratio {c['ratio']:.6f} (1/{1 / max(c['ratio'], 1e-12):.1f}); "
             f"compressed matrices alone {c['compressed_ratio']:.6f}")
    d = report.get("distillation")
    if d:
        echo(f"BitDelta scale distillation: {d['steps']} steps on {d['rows']} rows of {d['max_length']} tokens, "
             f"logits MSE {d['loss_first']:.4g} -> {d['loss_last']:.4g}; "
             f"mean scale {d['mean_scale_before']:.4g} -> {d['mean_scale_after']:.4g}")
    g = report.get("greedy_soup")
    if g:
        for i, (m, sc) in enumerate(zip(g["models"], g["individual_scores"])):
            echo(f"  ingredient {i}: score {sc:.4f}  {m}")
        for h in g["history"]:
            echo(f"  try adding {h['candidate']}: soup score {h['score']:.4f} -> "
                 f"{'kept' if h['accepted'] else 'rejected'}")
        echo(f"greedy soup of ingredients {g['selected']}: score {g['soup_score']:.4f}")
    w = report.get("wise_ft_sweep")
    if w:
        echo("  " + ", ".join(f"alpha {a}: {v:.4f}" for a, v in w["scores"].items()))
        echo(f"WiSE-FT: best alpha {w['alpha']}")
    if report.get("output") == "adapter":
        echo(f"LoRA adapter of rank {report['rank']} written to {out} (load with peft.PeftModel.from_pretrained "
             f"on {report.get('base_model_name_or_path') or 'its base'})")
    else:
        echo(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def _validation_lines(e) -> list[str]:
    """One line per problem of a pydantic ValidationError, naming the recipe field."""
    lines = []
    for err in e.errors():
        msg = "unknown field" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"merge recipe field '{where}': {msg}" if where else f"merge recipe: {msg}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("merge", help=HELP)
    def merge(
        recipe: Path = typer.Argument(..., help="Merge recipe YAML, or a shipped one by name (merge_ties, "
                                                "merge_soup, merge_lora_cat, merge_bitdelta)."),
        output: Path = typer.Option(..., "-o", "--output", help="Output directory (HF checkpoint or PEFT adapter)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        calibration: Path | None = typer.Option(
            None, "--calibration", help="bitdelta only: a text file (.txt, or JSONL with `text`) on which the scales "
                                        "are distilled against the fine-tuned model (logits MSE), as the paper."),
        calibration_steps: int = typer.Option(100, "--calibration-steps", min=1,
                                              help="Distillation steps of 4 rows x 128 tokens (BitDelta: 100)."),
        calibration_lr: float = typer.Option(1e-4, "--calibration-lr", help="AdamW lr of the scales (BitDelta: 1e-4)."),
        calibration_relative_lr: float | None = typer.Option(
            None, "--calibration-relative-lr", help="Instead: each scale's lr = this x its initial value (e.g. 0.02; "
                                                    "for short fine-tunes, whose scales are far below 1e-4)."),
    ):
        from tunelab.commands._common import fail, setup_logging

        setup_logging()
        from pydantic import ValidationError

        from tunelab.merging.recipe import load_recipe
        from tunelab.merging.run import run_merge

        if not recipe.is_file():
            from tunelab.commands._common import builtin_recipe_path

            shipped = builtin_recipe_path(str(recipe)) if str(recipe).startswith("merge_") else None
            if shipped is None:
                fail(f"merge recipe not found: {recipe}")
            recipe = shipped
        try:
            r = load_recipe(recipe)
            shape = f"{len(r.slices)} slice(s) of " if r.slices else ""
            typer.echo(f"{r.merge_method}: {shape}{len(r.model_refs)} model(s)"
                       + (f", base {r.base_model}" if r.base_model else ""))
            if calibration is not None and r.merge_method != "bitdelta":
                fail(f"--calibration distils BitDelta's scales; merge_method is {r.merge_method!r}")
            report: dict = {}
            out = run_merge(r, output, overwrite=overwrite, report=report)
            if calibration is not None:
                from tunelab.merging.bitdelta import calibrate_bitdelta

                report["distillation"] = calibrate_bitdelta(r, out, calibration, steps=calibration_steps,
                                                            lr=calibration_lr,
                                                            relative_lr=calibration_relative_lr)
        except ValidationError as e:
            fail("\n".join(_validation_lines(e)))
        except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
            fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
        _print_report(report, out)
