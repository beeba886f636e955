"""`tunelab select DATA -o subset.jsonl`: score, deduplicate and select a subset of instruction data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def needs_embeddings(selector: dict | None) -> bool:
    """Whether the selector a config names (default topk) picks by embeddings (kcenter, deita, qdit, ...)."""
    from tunelab.core.registry import UnknownName
    from tunelab.selection.registry import get_selector_class

    name = (selector or {}).get("name", "topk") if isinstance(selector, dict) else "topk"
    try:
        return get_selector_class(name).needs_embeddings
    except UnknownName:
        return False  # the config's validation names the unknown selector


def register(app: typer.Typer) -> None:
    @app.command()
    def select(
        data: Optional[str] = typer.Argument(None, help="Data file (.jsonl/.json/.parquet/.csv) or hub dataset."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides of the selection config, "
                                                                   "e.g. scorer.batch_size=16 dedup.near=true."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Subset file (.jsonl/.json/.parquet/"
                                                                           ".csv), in the input's record format."),
        scorer: Optional[str] = typer.Option(None, "--scorer", help="Scorer name (default ifd_ppl); 'none' for none."),
        selector: Optional[str] = typer.Option(None, "--selector", help="Selector name (default topk)."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Count (300), fraction (0.1) or percentage (10%)."),
        embedding: Optional[str] = typer.Option(None, "--embedding", help="Embedding for diversity selectors: "
                                                                          "minilm or lm (default: minilm when "
                                                                          "installed, else lm)."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of selection settings (the fields of "
                                                                     "a recipe's data.select)."),
        model: str = typer.Option("smollm2-135m-instruct", "--model", help="The model being tuned (LM scorers' "
                                                                           "default)."),
        fmt: str = typer.Option("auto", "--format", help="Record format (auto-detected by default)."),
        n: Optional[int] = typer.Option(None, "--n", help="Read only the first n records."),
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Report and cache directory (default: "
                                                                             "<output stem>.select/ beside it)."),
        list_all: bool = typer.Option(False, "--list", help="List the scorers and selectors with their papers."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars while scoring."),
    ):
        """Score, deduplicate and select a subset of the data (IFD, LESS, Deita, QDIT, CaR, k-center, ...)."""
        from tunelab.commands._common import fail, guard

        if list_all:
            from tunelab.selection.registry import list_scorers, list_selectors

            for title, table in (("scorers", list_scorers()), ("selectors", list_selectors())):
                typer.echo(f"{title}:")
                for name, cls in table.items():
                    typer.echo(f"  {name:<14} {cls.paper or ''}")
            return
        if data is None or output is None:
            fail("give a DATA file and -o/--output (or --list)")

        def go():
            import yaml
            from pydantic import ValidationError

            from tunelab.recipe import ModelConfig, RecipeError, apply_overrides, format_validation_error
            from tunelab.recipe.select import SelectConfig
            from tunelab.selection.context import ScoringContext
            from tunelab.selection.run import select_file, summary_lines

            raw: dict = {}
            if config is not None:
                if not config.is_file():
                    raise RecipeError(f"selection config not found: {config}")
                raw = yaml.safe_load(config.read_text()) or {}
                if isinstance(raw.get("data"), dict) and "select" in raw["data"]:  # a whole training recipe
                    raw = raw["data"]["select"] or {}
            if scorer is not None:
                same = isinstance(raw.get("scorer"), dict) and raw["scorer"].get("name") == scorer
                raw["scorer"] = None if scorer == "none" else (raw["scorer"] if same else {"name": scorer})
            if selector is not None:
                same = isinstance(raw.get("selector"), dict) and raw["selector"].get("name") == selector
                raw["selector"] = raw["selector"] if same else {"name": selector}
            if embedding is not None:
                raw["embedding"] = {"name": "embedding", "encoder": embedding}
            if budget is not None:
                raw["budget"] = budget
            raw = apply_overrides(raw, list(overrides or []))
            if raw.get("embedding") is None and needs_embeddings(raw.get("selector")):
                from tunelab.selection.scorers.embedding import default_encoder

                raw["embedding"] = {"name": "embedding", "encoder": default_encoder()}
                typer.echo(f"embedding: {raw['embedding']['encoder']} (the default for a diversity selector; "
                           f"--embedding minilm|lm chooses)")
            try:
                cfg = SelectConfig.model_validate(raw)
            except ValidationError as e:
                raise RecipeError(format_validation_error(e, prefix="select")) from None
            ctx = ScoringContext(model=ModelConfig(name_or_path=model), progress=progress)
            result, paths = select_file(data, cfg, output, ctx=ctx, fmt=fmt, n=n, report_dir=report_dir)
            for line in summary_lines(result.report):
                typer.echo(line)
            for k, v in paths.items():
                typer.echo(f"{k}: {v}")

        guard(go)
