"""`composite`: several scores combined into one, e.g. Deita's evol score = complexity x quality
(Liu et al. 2024, https://arxiv.org/abs/2312.15685).

    scorer: {name: composite, combine: product,
             parts: [{name: judge, aspect: complexity}, {name: judge, aspect: quality}]}

combine: product (Deita), sum, or mean of the parts' raw values (weighted by `weights` when given; a product
raises each part to its weight). A sample is a candidate only if it is one for every part. Each part's
value is written beside the combined score, under the part's name (and aspect, for judges).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from tunelab.selection.registry import ScoreOutput, Scorer, ScorerOptions, build_scorer, register_scorer


class CompositeOptions(ScorerOptions):
    parts: list[dict[str, Any]] = Field(..., min_length=1, description="Scorer specs ({name: ..., options}).")
    combine: Literal["product", "sum", "mean"] = "product"
    weights: list[float] | None = Field(None, description="One weight per part (default 1).")

    @field_validator("parts")
    @classmethod
    def _parts(cls, parts):
        for p in parts:
            if "name" not in p:
                raise ValueError("every part needs a `name`")
            build_scorer(p["name"], {k: v for k, v in p.items() if k != "name"})  # validates options
        return parts


def part_label(spec: dict[str, Any], i: int) -> str:
    return spec["name"] + (f"_{spec['aspect']}" if "aspect" in spec else "") + (f"_{i}" if i else "")


def combine(values: list[np.ndarray], how: str, weights: list[float] | None = None) -> np.ndarray:
    w = weights or [1.0] * len(values)
    if how == "product":
        out = np.ones_like(values[0], dtype=np.float64)
        for v, wi in zip(values, w):
            out *= np.power(v, wi)
        return out
    total = sum(wi * v for v, wi in zip(values, w))
    return total / sum(w) if how == "mean" else total


@register_scorer("composite", paper="https://arxiv.org/abs/2312.15685")
class Composite(Scorer):
    Config = CompositeOptions

    def _parts(self) -> list[Scorer]:
        if not hasattr(self, "_built"):  # built once: `check` runs per example
            self._built = [build_scorer(p["name"], {k: v for k, v in p.items() if k != "name"})
                           for p in self.config.parts]
        return self._built

    def check(self, example):
        return next((r for s in self._parts() if (r := s.check(example))), None)

    def score(self, examples, ctx) -> ScoreOutput:
        outs, columns = [], {}
        labels = [part_label(p, 0) for p in self.config.parts]
        for i, (spec, scorer) in enumerate(zip(self.config.parts, self._parts())):
            if scorer.kind != "score":
                raise ValueError(f"composite: part {spec['name']!r} is not a score")
            out = scorer.score(examples, ctx)
            outs.append(out)
            label = labels[i] if labels.count(labels[i]) == 1 else part_label(spec, i)
            columns[label] = out.values
        valid = np.logical_and.reduce([o.valid_mask() for o in outs])
        return ScoreOutput(combine([o.values for o in outs], self.config.combine, self.config.weights), valid, columns)

    def identity(self, ctx):
        return {str(i): s.identity(ctx) for i, s in enumerate(self._parts())}
