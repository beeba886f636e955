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
from .outputs import output_files
from .plan import Entry, layer_of, plan_models, plan_slices
from .recipe import COMPRESS_METHODS, LORA_METHODS, Recipe, load_recipe
from .resolve import resolve_recipe
from .score import TaskScorer
from .soup import greedy_soup, wise_ft_sweep
from .task_vectors import task_vector_merge

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

    def delta(self, name: str, against: Path, against_name: str | None = None) -> Tensor:
        """``self[name] - against[against_name]`` (``against_name`` defaults to ``name``)."""
        against_name = against_name or name
        if self.adapter is not None and self.own_base == against and against_name == name:
            return self._adapter_delta(name, self.run.tensor(against, name))
        return self.full(name) - self.run.tensor(against, against_name)

    def names(self) -> list[str]:
        if self.ckpt is not None:
            return self.ckpt.names()
        assert self.own_base is not None
        return self.run.readers[self.own_base].names()

    def has(self, name: str) -> bool:
        if self.ckpt is not None:
            return name in self.ckpt
        assert self.own_base is not None
        return name in self.run.readers[self.own_base]

    def dtype(self, name: str) -> torch.dtype:
        reader = self.ckpt if self.ckpt is not None else self.run.readers[self.own_base]  # type: ignore[index]
        return reader.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.ckpt is not None:
            return self.ckpt.shape(name)
        assert self.own_base is not None
        return self.run.readers[self.own_base].shape(name)


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
        # the base model is the reference the others are merged against, not one of them (as in mergekit), except
        # where it is an ingredient like any other (linear, greedy soup)
        skip_base = r.merge_method not in ("linear", "greedy_soup", "passthrough") and self.base is not None
        self.by_key: dict[str, _Input] = {}
        for ref in r.model_refs:
            key = str(resolve_model_path(ref))
            if key not in self.by_key and not (skip_base and key == str(self.base)):
                self.by_key[key] = _Input(self, ref, self.delta_base)
        self.inputs = list(self.by_key.values())
        if not self.inputs:
            raise ValueError("no model to merge besides base_model")
        self.entry_params = [(str(resolve_model_path(e.model)), e.parameters) for e in r.models]
        self.entry_params = [(k, p) for k, p in self.entry_params if k in self.by_key]
        self.compressor = (
            DeltaCompressor(r.merge_method, r.param("rank", 16))  # type: ignore[arg-type]
            if r.merge_method in COMPRESS_METHODS else None
        )
        self.report: dict[str, Any] = {"merge_method": r.merge_method, "output": "checkpoint"}
        # config and tokenizer come from the base model, else from the first (slice's first) input, as in mergekit
        first_key = str(resolve_model_path(r.slices[0].sources[0].model)) if r.slices else None
        first = self.by_key.get(first_key, self.inputs[0]) if first_key else self.inputs[0]
        if self.base is not None:
            self.ref_path = self.base
        elif first.ckpt is not None:
            self.ref_path = first.path
        else:
            raise ValueError(f"model {first.path} is an adapter: set base_model in the recipe")
        self.ref = self.readers[self.ref_path]
        self.names = self.ref.names()
        self.out_layers: int | None = None
        if r.slices:
            self.plan, self.out_layers = plan_slices(r, lambda ref: str(resolve_model_path(ref)), self._names_of,
                                                     str(self.base) if self.base is not None else None)
            self._validate_plan()
        else:
            self._validate()
            self.plan = plan_models(r, self.names, self._num_layers(), self.entry_params, self.base is not None)
        self.by_out = {e.out: e for e in self.plan}

    def _names_of(self, key: str) -> list[str]:
        if key in self.by_key:
            return self.by_key[key].names()
        return self.reader(Path(key)).names()

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
                    raise ValueError(f"shape mismatch for tensor {n!r}: {ref.shape(n)} in {self.ref_path}, "
                                     f"{rd.shape(n)} in {path}")
        for inp in self.inputs:
            if inp.adapter is None:
                continue
            for n in inp.adapter.names():
                if n not in ref_names:
                    raise ValueError(f"adapter {inp.path} targets tensor {n!r}, which is not in {self.ref_path}")
                if inp.adapter.delta_shape(n) != ref.shape(n):
                    raise ValueError(
                        f"shape mismatch for tensor {n!r}: adapter {inp.path} gives {inp.adapter.delta_shape(n)}, "
                        f"base has {ref.shape(n)}"
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

    def _num_layers(self) -> int:
        idx = [i for i in (layer_of(k) for k in self.names) if i is not None]
        return int(self.ref.config.get("num_hidden_layers") or (max(idx) + 1 if idx else 1))

    def _validate_plan(self) -> None:
        """Slices: every planned input tensor exists, with the shape of the others merged with it."""
        for e in self.plan:
            shapes = []
            if e.base is not None:
                assert self.base is not None
                if e.base not in self.readers[self.base]:
                    raise ValueError(f"tensor {e.base!r} is missing from {self.base}")
                shapes.append((self.readers[self.base].shape(e.base), e.base, self.base))
            for src in e.sources:
                inp = self.by_key[src.key]
                if not inp.has(src.name):
                    raise ValueError(f"tensor {src.name!r} is missing from {inp.path}")
                shapes.append((inp.shape(src.name), src.name, inp.path))
            for shape, name, path in shapes[1:]:
                if shape != shapes[0][0]:
                    raise ValueError(f"shape mismatch for tensor {name!r}: {shapes[0][0]} in {shapes[0][2]}, "
                                     f"{shape} in {path}")

    # ---- per-tensor merge --------------------------------------------------------------------
    def merge_tensor(self, name: str) -> Tensor:
        """The output tensor ``name`` (its plan entry merged)."""
        return self.merge_entry(self.by_out[name])

    def merge_entry(self, e: Entry) -> Tensor:
        r, m, t = self.recipe, self.recipe.merge_method, e.t
        inputs = [self.by_key[s.key] for s in e.sources]

        def per_input(name: str, default: Any) -> list[Any]:  # mergekit: per-input settings read the input's name
            return [r.resolve(name, default, s.params, *([e.scope] if e.scope else []), tensor=s.name, t=t)
                    for s in e.sources]

        def shared(name: str, default: Any) -> Any:
            return r.resolve(name, default, *([e.scope] if e.scope else []), tensor=e.out, t=t)

        def full(k: int) -> Tensor:
            return inputs[k].full(e.sources[k].name)

        w = [float(x) for x in per_input("weight", 1.0)]
        if m == "passthrough":
            scale = per_input("scale", None)[0]
            return full(0) if scale is None else full(0) * float(scale)
        if m == "linear":
            return ops.linear([full(k) for k in range(len(inputs))], w, bool(shared("normalize", True)))
        if m == "slerp":
            if e.base is not None and len(inputs) == 1:
                v0, v1 = self.tensor(self.base, e.base), full(0)
            else:
                v0, v1 = full(0), full(1)
            return ops.slerp(float(shared("t", 0.5)), v0, v1, r.param("dot_threshold", 0.9995))
        assert e.base is not None
        base_t = self.tensor(self.base, e.base)
        if m in COMPRESS_METHODS:
            return base_t + self.compressor(e.out, inputs[0].delta(e.sources[0].name, self.base, e.base),
                                            self.out_dtype(e.out))
        if m == "wise_ft":
            return ops.wise_ft(base_t, full(0), float(shared("alpha", 0.5)))
        if m == "model_stock":
            return ops.model_stock(base_t, [full(k) for k in range(len(inputs))])
        against = self.delta_base if m == "transfer" else self.base
        deltas = [inp.delta(s.name, against, e.base if m != "transfer" else s.name)
                  for inp, s in zip(inputs, e.sources)]
        lam = float(shared("lambda", 1.0))
        if m == "transfer":
            return base_t + w[0] * deltas[0]
        if m == "lines":
            merged = ops.task_arithmetic(deltas, w, lam)
            return base_t + ops.lines(merged, e.out, self._layers, float(shared("alpha", 0.0)), shared("beta", None))
        dens = [float(x) for x in per_input("density", 1.0)]
        sign = r.param("sign_method", "total")
        g = torch.Generator().manual_seed(tensor_seed(r.param("seed", 0), e.out))
        if r.convention == "peft":
            if m == "task_arithmetic":
                return base_t + ops.task_arithmetic(deltas, w, lam)
            if m == "ties":
                return base_t + ops.ties(deltas, dens, w, sign, lam)
            if m == "dare_linear":
                return base_t + ops.dare_linear(deltas, dens, g, w, lam)
            if m == "dare_ties":
                return base_t + ops.dare_ties(deltas, dens, g, w, sign, lam)
        if m in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
            sparsify = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}.get(m)
            return base_t + task_vector_merge(
                deltas, w, dens, sparsify=sparsify, consensus=sign if m in ("ties", "dare_ties") else None,  # type: ignore[arg-type]
                normalize=bool(shared("normalize", None)), rescale=bool(shared("rescale", None)), lam=lam, generator=g)
        raise ValueError(f"merge_method {m!r} is not a per-tensor method")

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        if self.recipe.merge_method == "lines":
            self._layers = self.num_layers()
        for e in self.plan:
            first = self.readers[self.base] if e.base is not None and self.base is not None else None
            dtype = first.dtype(e.base) if first is not None else self.by_key[e.sources[0].key].dtype(e.sources[0].name)
            if not dtype.is_floating_point:
                src = (self.base, e.base) if first is not None else (self.by_key[e.sources[0].key].path,
                                                                     e.sources[0].name)
                yield e.out, self.reader(src[0]).get(src[1])
                continue
            yield e.out, self.merge_tensor(e.out).to(self.recipe.torch_dtype or dtype)

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
            sweep = wise_ft_sweep(self.full_state_dict(None), self.full_state_dict(self.inputs[0]),
                                  r.parameters.alphas, score_fn)  # type: ignore[arg-type]
            sd = sweep.state_dict
            self.report["wise_ft_sweep"] = {"alpha": sweep.alpha,
                                            "scores": {str(a): v for a, v in sweep.scores.items()}}
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
        extra: dict[str, str | bytes] = {"tunelab_merge.yaml": r.to_yaml(), **output_files(
            r, run.ref.config, run.out_layers, run.base, run.ref_path,
            [i.path for i in run.inputs if i.ckpt is not None])}
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
