"""``run_merge``: execute a :class:`~tunelab.merging.recipe.Recipe` and write an HF checkpoint.

Streaming: tensors are processed one name at a time (each input is memory-mapped and only the
current tensor of every input is materialised), and output is flushed shard by shard, so peak
memory is about one output shard plus one tensor per input - not N models. ``greedy_soup`` and
the WiSE-FT ``alphas`` sweep need whole state dicts for ``score_fn`` and hold about three.

Inputs are HF checkpoint dirs or PEFT LoRA adapter dirs. An adapter is materialised as
``own_base + (B @ A) * scaling`` where ``own_base`` is its ``base_model_name_or_path`` when that
is a local directory, otherwise the recipe's base (``source_base`` for ``transfer``); when
``own_base`` is the base the deltas are taken against, the adapter delta is used directly.
In ``linear``/``greedy_soup`` the ``base_model`` only supplies config/tokenizer (and adapter
bases); it is not itself an ingredient unless listed in ``models``. ``slerp`` goes from the first
of two models to the second, or from ``base_model`` to its single model, by ``t``.
DARE masks use a per-tensor generator seeded with :func:`tensor_seed` (``parameters.seed``).

Everything is validated before any tensor is merged: architectures (``architectures`` and
``model_type`` of config.json), tensor names and shapes of every input; a mismatch raises
``ValueError`` naming the tensor. Output is written atomically, so on any error nothing is left.

References are resolved first (:mod:`.resolve`): tunelab run directories become their
``export/merged`` (or ``export/adapter``), built-in aliases their cached checkpoint.
``bitdelta`` / ``svd_delta`` stream one fine-tune's delta through
:class:`~tunelab.merging.compress.DeltaCompressor` and write ``base + reconstructed delta``;
the ``lora_*`` methods write a PEFT adapter (:func:`~tunelab.merging.lora.run_lora_recipe`).
Without a ``score_fn``, greedy soup / the alphas sweep score with
:class:`~tunelab.merging.score.TaskScorer` on ``parameters.score_task``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tunelab.weights import AdapterReader, CheckpointReader, CheckpointWriter, is_adapter_dir, resolve_model_path

from . import ops
from .compress import DeltaCompressor
from .recipe import COMPRESS_METHODS, LORA_METHODS, Recipe, load_recipe
from .resolve import resolve_recipe
from .score import TaskScorer
from .soup import greedy_soup, wise_ft_sweep

Tensor = torch.Tensor
ScoreFn = Callable[[Mapping[str, Tensor]], float]

__all__ = ["run_merge", "tensor_seed"]


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor DARE seed, so masks do not depend on iteration order or sharding."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _Input:
    def __init__(self, run: _Run, ref: str, delta_base: Path | None):
        self.run = run
        self.path = resolve_model_path(ref)
        self.adapter: AdapterReader | None = None
        self.ckpt: CheckpointReader | None = None
        self.own_base: Path | None = None
        if is_adapter_dir(self.path):
            self.adapter = AdapterReader(self.path)
            own = self.adapter.base_model_name_or_path
            if own and Path(own).expanduser().is_dir():
                self.own_base = Path(own).expanduser().resolve()
            else:
                self.own_base = delta_base
            if self.own_base is None:
                raise ValueError(f"adapter {self.path} needs a base model: set base_model in the recipe")
            run.reader(self.own_base)
        else:
            self.ckpt = run.reader(self.path)

    def _adapter_delta(self, name: str, own_base_t: Tensor) -> Tensor:
        assert self.adapter is not None
        if name in self.adapter.modules or name in self.adapter.full_keys:
            return self.adapter.delta(name, own_base_t)
        return torch.zeros_like(own_base_t)

    def full(self, name: str) -> Tensor:
        if self.ckpt is not None:
            return self.run.tensor(self.path, name)
        assert self.own_base is not None
        b = self.run.tensor(self.own_base, name)
        return b + self._adapter_delta(name, b)

    def delta(self, name: str, against: Path) -> Tensor:
        if self.adapter is not None and self.own_base == against:
            return self._adapter_delta(name, self.run.tensor(against, name))
        return self.full(name) - self.run.tensor(against, name)


class _Run:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.readers: dict[Path, CheckpointReader] = {}
        self._cache: dict[Path, Tensor] = {}
        self._cache_name: str | None = None
        r = recipe
        self.base = resolve_model_path(r.base_model) if r.base_model else None
        if self.base is not None and is_adapter_dir(self.base):
            raise ValueError(f"base_model {self.base} is a PEFT adapter, not a checkpoint")
        if self.base is not None:
            self.reader(self.base)
        self.source_base = resolve_model_path(r.parameters.source_base) if r.parameters.source_base else None
        if self.source_base is not None:
            self.reader(self.source_base)
        self.delta_base = self.source_base if r.merge_method == "transfer" else self.base
        self.inputs = [_Input(self, e.model, self.delta_base) for e in r.models]
        self.compressor = DeltaCompressor(r.merge_method, r.param("rank", 16)) if r.merge_method in COMPRESS_METHODS else None  # type: ignore[arg-type]
        self.report: dict[str, Any] = {"merge_method": r.merge_method, "output": "checkpoint"}
        if self.base is not None:
            self.ref_path = self.base
        elif self.inputs[0].ckpt is not None:
            self.ref_path = self.inputs[0].path
        else:
            raise ValueError(f"model {self.inputs[0].path} is an adapter: set base_model in the recipe")
        self.ref = self.readers[self.ref_path]
        self.names = self.ref.names()
        self._validate()

    def reader(self, path: Path) -> CheckpointReader:
        if path not in self.readers:
            self.readers[path] = CheckpointReader(path)
        return self.readers[path]

    def tensor(self, path: Path, name: str) -> Tensor:
        """float32 tensor ``name`` of checkpoint ``path``, cached for the current tensor name."""
        if name != self._cache_name:
            self._cache, self._cache_name = {}, name
        if path not in self._cache:
            self._cache[path] = self.readers[path].get(name).float()
        return self._cache[path]

    def _validate(self) -> None:
        ref, ref_names = self.ref, set(self.names)
        for key in ("architectures", "model_type"):
            want = ref.config.get(key)
            for path, rd in self.readers.items():
                got = rd.config.get(key)
                if want is not None and got is not None and got != want:
                    raise ValueError(f"architecture mismatch: {path} has {key}={got!r}, {self.ref_path} has {want!r}")
        for path, rd in self.readers.items():
            names = rd.names()
            for n in names:
                if n not in ref_names:
                    raise ValueError(f"tensor {n!r} of {path} is not in {self.ref_path}")
            got = set(names)
            for n in self.names:
                if n not in got:
                    raise ValueError(f"tensor {n!r} is missing from {path}")
                if rd.shape(n) != ref.shape(n):
                    raise ValueError(f"shape mismatch for tensor {n!r}: {ref.shape(n)} in {self.ref_path}, {rd.shape(n)} in {path}")
        for inp in self.inputs:
            if inp.adapter is None:
                continue
            for n in inp.adapter.names():
                if n not in ref_names:
                    raise ValueError(f"adapter {inp.path} targets tensor {n!r}, which is not in {self.ref_path}")
                if inp.adapter.delta_shape(n) != ref.shape(n):
                    raise ValueError(
                        f"shape mismatch for tensor {n!r}: adapter {inp.path} gives {inp.adapter.delta_shape(n)}, base has {ref.shape(n)}"
                    )

    def out_dtype(self, name: str) -> torch.dtype:
        return self.recipe.torch_dtype or self.ref.dtype(name)

    def num_layers(self) -> int:
        n = self.recipe.parameters.num_layers or self.ref.config.get("num_hidden_layers")
        if n:
            return int(n)
        idx = [i for i in (ops.layer_index(k) for k in self.names) if i is not None]
        if not idx:
            raise ValueError("lines: no layer indices found in tensor names; set parameters.num_layers")
        return max(idx) + 1

    # ---- per-tensor merge --------------------------------------------------------------------
    def merge_tensor(self, name: str) -> Tensor:
        r, m = self.recipe, self.recipe.merge_method
        w = r.weights()
        if m == "linear":
            return ops.linear([i.full(name) for i in self.inputs], w, r.param("normalize", True))
        if m == "slerp":
            if len(self.inputs) == 2:
                v0, v1 = self.inputs[0].full(name), self.inputs[1].full(name)
            else:
                v0, v1 = self.tensor(self.base, name), self.inputs[0].full(name)
            return ops.slerp(r.param("t", 0.5), v0, v1, r.param("dot_threshold", 0.9995))
        base_t = self.tensor(self.base, name)
        if m in COMPRESS_METHODS:
            return base_t + self.compressor(name, self.inputs[0].delta(name, self.base), self.out_dtype(name))
        if m == "wise_ft":
            return ops.wise_ft(base_t, self.inputs[0].full(name), r.param("alpha", 0.5))
        if m == "model_stock":
            return ops.model_stock(base_t, [i.full(name) for i in self.inputs])
        deltas = [i.delta(name, self.delta_base) for i in self.inputs]
        lam = r.param("lambda", 1.0)
        if m == "task_arithmetic":
            return base_t + ops.task_arithmetic(deltas, w, lam)
        if m == "ties":
            return base_t + ops.ties(deltas, r.densities(), w, r.param("sign_method", "total"), lam)
        if m in ("dare_linear", "dare_ties"):
            g = torch.Generator().manual_seed(tensor_seed(r.param("seed", 0), name))
            if m == "dare_linear":
                return base_t + ops.dare_linear(deltas, r.densities(), g, w, lam)
            return base_t + ops.dare_ties(deltas, r.densities(), g, w, r.param("sign_method", "total"), lam)
        if m == "lines":
            merged = ops.task_arithmetic(deltas, w, lam)
            return base_t + ops.lines(merged, name, self._layers, r.param("alpha", 0.0), r.param("beta", None))
        if m == "transfer":
            return base_t + w[0] * deltas[0]
        raise ValueError(f"merge_method {m!r} is not a per-tensor method")

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        if self.recipe.merge_method == "lines":
            self._layers = self.num_layers()
        for name in self.names:
            if not self.ref.dtype(name).is_floating_point:
                yield name, self.ref.get(name)
                continue
            yield name, self.merge_tensor(name).to(self.out_dtype(name))

    def full_state_dict(self, inp: _Input | None) -> dict[str, Tensor]:
        """Whole model in memory (``inp=None``: the base), float tensors in their stored dtype."""
        out = {}
        for n in self.names:
            if inp is None:
                out[n] = self.readers[self.base].get(n)
            elif not self.ref.dtype(n).is_floating_point:
                out[n] = self.ref.get(n)
            else:
                out[n] = inp.full(n).to(self.ref.dtype(n))
        return out

    def in_memory(self, score_fn: ScoreFn | None) -> Iterator[tuple[str, Tensor]] | None:
        r = self.recipe
        if r.merge_method == "greedy_soup":
            loaders = [(lambda i=i: self.full_state_dict(i)) for i in self.inputs]
            res = greedy_soup(loaders, score_fn)  # type: ignore[arg-type]
            sd = res.state_dict
            self.report["greedy_soup"] = {
                "models": [str(i.path) for i in self.inputs], "individual_scores": res.individual_scores,
                "selected": res.selected, "soup_score": res.soup_score,
                "history": [{"candidate": c, "score": sc, "accepted": a} for c, sc, a in res.history],
            }
        elif r.merge_method == "wise_ft" and r.parameters.alphas:
            sweep = wise_ft_sweep(self.full_state_dict(None), self.full_state_dict(self.inputs[0]), r.parameters.alphas, score_fn)  # type: ignore[arg-type]
            sd = sweep.state_dict
            self.report["wise_ft_sweep"] = {"alpha": sweep.alpha, "scores": {str(a): v for a, v in sweep.scores.items()}}
        else:
            return None
        return ((n, t.to(self.out_dtype(n)) if t.is_floating_point() else t) for n, t in sd.items())

    def close(self) -> None:
        for rd in self.readers.values():
            rd.close()
        for i in self.inputs:
            if i.adapter is not None:
                i.adapter.close()


def _task_scorer(r: Recipe, model_dir: Path) -> TaskScorer:
    p = r.parameters
    return TaskScorer(model_dir, r.score_tasks, n=p.score_n or 50, metric=p.score_metric or "exact_match",
                      seed=p.score_seed or 0)


def run_merge(
    recipe: Recipe | dict[str, Any] | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    score_fn: ScoreFn | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    report: dict[str, Any] | None = None,
) -> Path:
    """Run a merge recipe (a :class:`Recipe`, dict, YAML path or YAML text) into ``output_dir``.

    ``score_fn(state_dict) -> float`` (higher is better) is needed by ``greedy_soup`` and by
    ``wise_ft`` with ``parameters.alphas``; without one, ``parameters.score_task`` builds a
    :class:`~tunelab.merging.score.TaskScorer` on the base (or first model). The output dir gets the
    merged safetensors (sharded at ``max_shard_bytes``), config/tokenizer files of the base (or first
    model), the resolved recipe as ``tunelab_merge.yaml`` and ``tunelab_merge_report.json``; the
    ``lora_*`` methods write a PEFT adapter dir instead. ``report`` (a dict, if given) receives what
    the merge measured or chose: compression sizes and ratio, soup selection, sweep scores.
    Raises ``ValueError`` (nothing written) on incompatible inputs and ``FileExistsError`` if
    ``output_dir`` is non-empty and ``overwrite`` is false.
    """
    r = resolve_recipe(load_recipe(recipe))
    out = Path(output_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    if r.merge_method in LORA_METHODS:
        from .lora import run_lora_recipe

        info = run_lora_recipe(r, out, overwrite=overwrite)
        if report is not None:
            report.update(info)
        return out
    if r.needs_score and score_fn is None and not r.score_tasks:
        raise ValueError(f"merge_method {r.merge_method!r} with these parameters needs a score_fn "
                         "or parameters.score_task (a built-in task to score on)")
    run = _Run(r)
    try:
        if r.needs_score and score_fn is None:
            score_fn = _task_scorer(r, run.ref_path)
        tensors = run.in_memory(score_fn) or run.stream()
        extra = {"tunelab_merge.yaml": r.to_yaml()}
        with CheckpointWriter(
            out,
            copy_from=run.ref_path,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            dtype=r.torch_dtype,
            extra_files=extra,
        ) as writer:
            for name, t in tensors:
                writer.add(name, t)
            if run.compressor is not None:
                run.report["compression"] = run.compressor.report()
            if isinstance(score_fn, TaskScorer):
                run.report["score"] = {"tasks": r.score_tasks, "metric": score_fn.metric, "n": score_fn.n,
                                       "seed": score_fn.seed, "calls": score_fn.history}
            extra["tunelab_merge_report.json"] = json.dumps(run.report, indent=2) + "\n"  # written on exit
    finally:
        run.close()
    if report is not None:
        report.update(run.report)
    return out
