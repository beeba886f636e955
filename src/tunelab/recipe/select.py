"""The selection config's shape: what `tunelab select` and a recipe's `data.select:` section say.

Schema only (layer 2). Scorer and selector options are open dictionaries here (`scorer: {name: ifd_ppl,
batch_size: 16}`) validated by the registered class's own `Config` in `selection.registry.validate_select_config`
(called by `tunelab.validate` for recipes and by `selection.run` before any work), as methods and objectives
are, so a new scorer never touches this file.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScorerSpec(BaseModel):
    """`name` picks a registered scorer (`tunelab select --list`); the other keys are its options."""

    model_config = ConfigDict(extra="allow")
    name: str = "ifd_ppl"

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name"}


class SelectorSpec(BaseModel):
    """`name` picks a registered selector; the other keys are its options."""

    model_config = ConfigDict(extra="allow")
    name: str = "topk"

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name"}


class DedupConfig(_Strict):
    """Deduplication of the pool before scoring (the first occurrence is kept)."""

    exact: bool = Field(True, description="Drop exact duplicates (same text after whitespace/case normalisation).")
    near: bool = Field(False, description="Drop near-duplicates by MinHash LSH (Jaccard of word n-gram shingles).")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity above which two records are "
                                                          "near-duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: a closer Jaccard estimate).")
    ngram: int = Field(3, ge=1, description="Words per shingle.")


def parse_budget_value(value: Any) -> int | str | None:
    """`10%`, `0.1` (a fraction), `300` or None (all the selector keeps). Range checks come with the pool."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError("budget must be a count, a fraction or a percentage, not a boolean")
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value > 1 and value.is_integer():
            return int(value)
        return f"{100 * value:g}%"  # 0.1 -> 10%; 1.0 -> 100%; 0.0 -> 0% (an error once the pool is known)
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                float(text[:-1])
                return text
            return parse_budget_value(float(text)) if "." in text else int(text)
        except ValueError:
            pass
    raise ValueError(f"budget {value!r} is not a count (300), a fraction (0.1) or a percentage (10%)")


class SelectConfig(_Strict):
    """Score, deduplicate and select a subset of the training data before training."""

    scorer: ScorerSpec | None = Field(
        default_factory=lambda: ScorerSpec(name="ifd_ppl"),
        description="Quality score (`ifd_ppl`, `ifd_loss`, `perplexity`, `length`, `judge`, `reward`, `gradient`, "
                    "`composite`); null for selectors that need none (random, kcenter). See docs/selection.md.")
    embedding: ScorerSpec | None = Field(
        None, description="Embedding for diversity selectors (kcenter, deita, qdit, cluster_rank): "
                          "`{name: embedding, encoder: minilm | lm}`.")
    selector: SelectorSpec = Field(default_factory=SelectorSpec,
                                   description="`random`, `topk`, `threshold`, `kcenter`, `deita`, `qdit`, "
                                               "`cluster_rank`, `grape`, with its options.")
    budget: int | str | None = Field("10%", description="Examples to keep: a count (300), a fraction (0.1) or a "
                                                        "percentage of the data read (10%); null = what the "
                                                        "selector keeps (threshold, grape).")
    descending: bool | None = Field(None, description="Prefer high scores (true) or low (false); null = the "
                                                      "scorer's own direction.")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    cache_dir: str | None = Field(None, description="Score cache (keyed by data hash + model + scorer config); "
                                                    "null = `select/cache` in the run directory.")
    seed: int = Field(0, description="Seed of random choices (random selector, k-means, projections).")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> int | str | None:
        return parse_budget_value(v)
