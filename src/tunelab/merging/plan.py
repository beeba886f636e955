"""Which input tensors make each output tensor, and at which layer position ``t`` (mergekit's planning).

``models:`` recipes merge every tensor name of the reference checkpoint from the same name in each input.
``slices:`` recipes stack slices: slice ``k`` of ``n`` layers writes output layers ``o .. o+n-1``, output layer
``o + j`` being merged from layer ``start + j`` of each source (``layer_range: [start, end)``), renamed. Tensors
outside the layer stack come from the first slice's sources (names with ``embed``: the embeddings) or the last
slice's (final norm, LM head), as mergekit's Llama architecture has them.

``t`` (where a gradient ``[v0, ..., vk]`` is read): ``j / (n - 1)`` for layer ``j`` of a slice (a whole model is
one slice), ``1`` for a one-layer slice, ``0`` for tensors outside the layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .recipe import MergeParameters, ModelParameters, Recipe

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Source:
    key: str  # the input model (its resolved path)
    name: str  # the tensor's name in that model
    params: ModelParameters


@dataclass(frozen=True)
class Entry:
    out: str  # output tensor name
    t: float  # layer position in [0, 1] for gradients
    sources: tuple[Source, ...]  # the inputs merged (the base model excluded)
    base: str | None  # the tensor's name in the base model, when the method has one
    scope: MergeParameters | None = None  # the slice's parameters (between the sources' and the global ones)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def with_layer(name: str, index: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{index}.", name, count=1)


def position(j: int, n: int) -> float:
    return j / (n - 1) if n > 1 else 1.0


def plan_models(recipe: Recipe, names: Sequence[str], num_layers: int, sources: Sequence[tuple[str, ModelParameters]],
                has_base: bool) -> list[Entry]:
    """One entry per tensor name; `sources` = (key, parameters) of the inputs besides the base."""
    out = []
    for name in names:
        idx = layer_of(name)
        t = 0.0 if idx is None else position(idx, num_layers)
        out.append(Entry(name, t, tuple(Source(k, name, p) for k, p in sources), name if has_base else None))
    return out


def plan_slices(recipe: Recipe, key_of: Callable[[str], str], names_of: Callable[[str], list[str]],
                base_key: str | None) -> tuple[list[Entry], int]:
    """Entries of a `slices:` recipe and the number of output layers. The source whose model is the base model
    gives the base tensor (it must be among a slice's sources when the method needs a base)."""
    entries: list[Entry] = []
    out_layer = 0
    for k, sl in enumerate(recipe.slices):
        srcs = [(key_of(s.model), s) for s in sl.sources]
        base_src = next((s for key, s in srcs if key == base_key), None)
        if base_key is not None and base_src is None:
            raise ValueError(f"slices[{k}]: the base model {base_key} is not among the slice's sources")
        others = [(key, s) for key, s in srcs if key != base_key]
        first_key, first = srcs[0]
        for j in range(sl.length):
            at = first.layer_range[0] + j
            for name in names_of(first_key):
                if layer_of(name) != at:
                    continue
                entries.append(Entry(
                    with_layer(name, out_layer), position(j, sl.length),
                    tuple(Source(key, with_layer(name, s.layer_range[0] + j), s.parameters) for key, s in others),
                    with_layer(name, base_src.layer_range[0] + j) if base_src is not None else None, sl.parameters))
            out_layer += 1
    first_key = key_of(recipe.slices[0].sources[0].model)
    for name in names_of(first_key):
        if layer_of(name) is not None:
            continue
        k = 0 if "embed" in name else len(recipe.slices) - 1
        sl = recipe.slices[k]
        srcs = [(key_of(s.model), s) for s in sl.sources]
        has_base = any(key == base_key for key, _ in srcs)
        entries.append(Entry(name, 0.0, tuple(Source(key, name, s.parameters) for key, s in srcs if key != base_key),
                             name if has_base else None, sl.parameters))
    return entries, out_layer
