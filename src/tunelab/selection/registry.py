"""The Scorer and Selector interfaces and their registries.

A scorer is a small class with a typed `Config`, registered under a name with its paper:

    @register_scorer("ifd_ppl", paper="https://arxiv.org/abs/2402.00530")
    class IFDPerplexity(Scorer):
        Config = IFDOptions
        def score(self, examples, ctx) -> ScoreOutput: ...

`score` returns one value per example (`kind = "score"`) or one unit-norm vector per example
(`kind = "embedding"`), plus a validity mask (IFD >= 1 is no candidate) and extra columns written beside
the score. A selector gets the candidates (`Pool`: scores oriented so that higher is preferred,
embeddings) and a budget, and returns indices into the pool. Every module of
`tunelab.selection.scorers` / `.selectors` not starting with `_` is imported by the registry, so a new
scorer or selector is one new file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.core.registry import Registry
from tunelab.data.formats import ChatExample, DataError, PreferenceExample, TextExample

if TYPE_CHECKING:
    from tunelab.recipe.select import SelectConfig
    from tunelab.selection.context import ScoringContext


class SelectionError(DataError):
    """A selection that cannot be made (bad budget, records a scorer cannot use); the message says why."""


class ScorerOptions(BaseModel):
    """Base for scorer configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class SelectorOptions(BaseModel):
    """Base for selector configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ScoreOutput:
    values: np.ndarray  # [N] float64 scores, or [N, d] float32 unit-norm embeddings
    valid: np.ndarray | None = None  # [N] bool; False: no candidate (e.g. IFD >= 1); None: all valid
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # extra per-example values, each [N]

    def valid_mask(self) -> np.ndarray:
        return np.ones(len(self.values), bool) if self.valid is None else np.asarray(self.valid, bool)


class Scorer:
    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = ScorerOptions
    kind: ClassVar[str] = "score"  # "score" | "embedding"
    higher_is_better: ClassVar[bool] = True  # the direction selectors prefer unless `descending` says otherwise
    needs_prompt: ClassVar[bool] = True  # needs a chat with a user turn before the answer (not plain text)

    def __init__(self, config: BaseModel | None = None):
        self.config = config if config is not None else self.Config()

    def check(self, example: Any) -> str | None:
        """Why this example cannot be scored (None: it can). Errors are gathered over the whole pool."""
        if isinstance(example, PreferenceExample):
            return None  # scored on prompt + chosen (see as_chat)
        if isinstance(example, TextExample):
            return "a plain-text record has no instruction/response to score" if self.needs_prompt else None
        if isinstance(example, ChatExample):
            if not example.messages or example.messages[-1]["role"] != "assistant":
                return "the last message must be the assistant's response"
            if self.needs_prompt and not any(m["role"] == "user" for m in example.messages[:-1]):
                return "no user turn (instruction) before the response"
            return None
        return f"cannot score a {type(example).__name__}"

    def score(self, examples: list, ctx: "ScoringContext") -> ScoreOutput:
        raise NotImplementedError

    def identity(self, ctx: "ScoringContext") -> dict[str, Any]:
        """What besides the data and config the scores depend on (the models' identities), for the cache key."""
        return {}


@dataclass
class Pool:
    """The candidates a selector chooses from (after dedup and validity filtering)."""

    examples: list
    scores: np.ndarray | None = None  # [N] float64, oriented: higher = preferred
    raw_scores: np.ndarray | None = None  # [N] float64, as the scorer gave them (threshold bounds apply to these)
    embeddings: np.ndarray | None = None  # [N, d] float32, unit rows
    seed: int = 0
    report: dict[str, Any] = field(default_factory=dict)  # what a selector wants reported (radius, clusters)

    def __len__(self) -> int:
        return len(self.examples)


class Selector:
    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = SelectorOptions
    needs_scores: ClassVar[bool] = False
    needs_embeddings: ClassVar[bool] = False
    needs_budget: ClassVar[bool] = True

    def __init__(self, config: BaseModel | None = None):
        self.config = config if config is not None else self.Config()

    def select(self, pool: Pool, budget: int | None) -> np.ndarray:
        """Indices into the pool (int64, in selection order)."""
        raise NotImplementedError


_SCORERS: Registry = Registry("scorer", package="tunelab.selection.scorers")
_SELECTORS: Registry = Registry("selector", package="tunelab.selection.selectors")


def register_scorer(name: str, paper: str | None = None):
    return _SCORERS.register(name, paper)


def register_selector(name: str, paper: str | None = None):
    return _SELECTORS.register(name, paper)


def get_scorer_class(name: str) -> type[Scorer]:
    return _SCORERS.get(name)


def get_selector_class(name: str) -> type[Selector]:
    return _SELECTORS.get(name)


def list_scorers() -> dict[str, type[Scorer]]:
    return _SCORERS.sorted()


def list_selectors() -> dict[str, type[Selector]]:
    return _SELECTORS.sorted()



def build_scorer(name: str, options: dict[str, Any]) -> Scorer:
    cls = get_scorer_class(name)
    return cls(cls.Config.model_validate(options))


def build_selector(name: str, options: dict[str, Any]) -> Selector:
    cls = get_selector_class(name)
    return cls(cls.Config.model_validate(options))


def _errors(err: ValidationError, prefix: str) -> str:
    return "; ".join(f"{prefix}.{'.'.join(str(p) for p in e['loc'])}: "
                     f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}" for e in err.errors())


def validate_select_config(cfg: "SelectConfig") -> None:
    """Options checked against the registered classes; a selector's needs checked against what is configured."""
    try:
        parts = [("scorer", get_scorer_class, cfg.scorer), ("embedding", get_scorer_class, cfg.embedding),
                 ("selector", get_selector_class, cfg.selector)]
        classes = {}
        for label, getter, spec in parts:
            if spec is None:
                continue
            cls = classes[label] = getter(spec.name)
            cls.Config.model_validate(spec.options())
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except ValidationError as e:
        raise ValueError(_errors(e, label)) from None
    if "embedding" in classes and classes["embedding"].kind != "embedding":
        raise ValueError(f"embedding: {cfg.embedding.name!r} is a score, not an embedding scorer")
    if "scorer" in classes and classes["scorer"].kind != "score":
        raise ValueError(f"scorer: {cfg.scorer.name!r} gives embeddings; put it under `embedding:`")
    sel = classes["selector"]
    if sel.needs_scores and cfg.scorer is None:
        raise ValueError(f"selector {cfg.selector.name!r} ranks by a score: set `scorer`")
    if sel.needs_embeddings and cfg.embedding is None:
        raise ValueError(f"selector {cfg.selector.name!r} needs embeddings: set `embedding: {{name: embedding}}`")
    if sel.needs_budget and cfg.budget is None:
        raise ValueError(f"selector {cfg.selector.name!r} needs a budget")


def resolve_budget(budget: int | str | None, n_read: int, n_candidates: int, why: str = "") -> int | None:
    """A count from `300` / `10%` (of the records read); 0, or more than the candidates left, is an error."""
    if budget is None:
        return None
    if isinstance(budget, str):
        pct = float(budget.rstrip("%"))
        if not 0 < pct <= 100:
            raise SelectionError(f"budget {budget} must be a percentage in (0, 100]")
        count = max(1, math.floor(n_read * pct / 100 + 0.5))
    else:
        count = int(budget)
    if count <= 0:
        raise SelectionError(f"budget {budget!r} selects nothing: give a positive count or percentage")
    if count > n_candidates:
        raise SelectionError(f"budget {budget!r} ({count} examples) is larger than the pool: {n_candidates} "
                             f"candidates{why}")
    return count


def as_chat(example: Any) -> ChatExample:
    """A chat view of an example: preference pairs are scored on prompt + chosen."""
    if isinstance(example, PreferenceExample):
        return ChatExample(example.prompt + example.chosen, example.origin)
    return example
