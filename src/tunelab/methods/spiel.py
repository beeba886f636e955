"""SpIEL: sparse fine-tuning with a fixed budget of (index, delta) pairs that are pruned and regrown.

Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models", https://arxiv.org/abs/2401.16405
(SpIEL-AG, accumulated-gradient regrowth). Update rule: each targeted W [out, in] becomes
W0 + scatter(idx, phi) with k = density * numel indices idx and trainable deltas phi [k];
phi <- AdamW(phi, dL/dphi) every step, and every `reselect_every` steps the `drop_fraction` of deltas
nearest zero are dropped and as many indices regrown where the gradient accumulated over the preceding
`accumulation_steps` steps is largest (|sum g|); regrown deltas start at 0 with zeroed Adam moments.

Defaults (those of the authors' PEFT fork): density 0.01, reselect every 100 steps, 5 accumulation steps,
drop fraction 0.2. Differences: the initial indices are uniform random (seeded), the drop fraction is
constant (they decay it linearly), and the accumulator is dense per matrix during the accumulation window
only (they track top-|g| candidates to save memory).

Implementation: a `torch.nn.utils.parametrize` parametrization on each Linear's weight, so the model keeps
its structure; `merged_model` removes it leaving W0 + delta in place. `save_adapter` exports the delta
sparsely: `sparse_delta.safetensors` (`<module>.weight.indices` int64 flat indices, `<module>.weight.values`)
+ `sparse_delta.json`; `apply_sparse_delta(model, dir)` merges it into a base model. Checkpoints carry the
indices (and a running accumulator) through `trainable_state_dict()`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch.nn.utils import parametrize

from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register

log = logging.getLogger(__name__)

FORMAT = "tunelab-sparse-delta"


class SparseDelta(torch.nn.Module):
    """Parametrization W0 -> W0 + scatter(indices, values): values [k] trainable, indices [k] int64 buffer."""

    def __init__(self, shape: torch.Size, k: int, generator: torch.Generator):
        super().__init__()
        self.numel = numel = shape[0] * shape[1]
        self.values = torch.nn.Parameter(torch.zeros(k))  # [k] deltas
        self.register_buffer("indices", torch.randperm(numel, generator=generator)[:k].sort().values)  # [k]
        self.accum: torch.Tensor | None = None  # [numel] sum of dL/dW over the accumulation window, or None

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        w = w0.flatten().index_add(0, self.indices, self.values.to(w0.dtype)).view_as(w0)  # [out, in]
        if self.accum is not None and w.requires_grad:
            w.register_hook(self._accumulate)
        return w

    def _accumulate(self, grad: torch.Tensor) -> None:
        self.accum.add_(grad.detach().flatten().to(self.accum.dtype))


def _deltas(model) -> dict[str, SparseDelta]:
    """{module name: its SparseDelta} for every parametrized Linear of `model`."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, SparseDelta):
                    out[name] = p
    return out


@torch.no_grad()
def apply_sparse_delta(model, directory: str | Path):
    """Add a delta saved by `SpIEL.save_adapter` into a plain model's weights (in place); returns model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "sparse_delta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a {FORMAT} export")
    tensors = load_file(str(directory / "sparse_delta.safetensors"))
    modules = dict(model.named_modules())
    for name in meta["modules"]:
        w = modules[name].weight
        w.view(-1).index_add_(0, tensors[f"{name}.weight.indices"], tensors[f"{name}.weight.values"].to(w.dtype))
    return model


@register("spiel", paper="https://arxiv.org/abs/2401.16405")
class SpIEL(Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "a sparse delta over a fixed budget of indices (pruned and regrown)"
    adapter_format = "sparse_delta"
    class Config(MethodOptions):
        density: float = Field(0.01, gt=0, le=1, description="Fraction of each matrix's entries with a delta.")
        reselect_every: int = Field(100, ge=2, description="Steps between prune-and-regrow updates.")
        accumulation_steps: int = Field(5, ge=1, description="Steps whose gradients are summed for regrowth.")
        drop_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of deltas replaced at each update.")
        seed: int = Field(0, description="Seed of the initial random indices.")
        target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                          description="Linear modules (name suffixes) that get a sparse delta.")

        @model_validator(mode="after")
        def _window_fits(self):
            if self.accumulation_steps >= self.reselect_every:
                raise ValueError("accumulation_steps must be smaller than reselect_every")
            return self

    def __init__(self, config=None):
        super().__init__(config)
        self.step = 0

    def prepare(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.config.seed)
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in self.config.target_modules]
        if not targets:
            raise ValueError(f"method spiel: no Linear module matches {self.config.target_modules}")
        for _, m in targets:
            k = max(1, round(self.config.density * m.weight.numel()))
            delta = SparseDelta(m.weight.shape, k, gen).to(m.weight.device)
            parametrize.register_parametrization(m, "weight", delta)
            m.parametrizations.weight.original.requires_grad_(False)
        self._model = model
        return model

    # -- prune and regrow --------------------------------------------------------------------------
    def on_step_end(self, model, step: int, optimizer) -> None:
        self.step = step
        r, a = self.config.reselect_every, self.config.accumulation_steps
        if step % r == 0:
            self.reselect(optimizer)
        if (step + a) % r == 0:  # the next `a` steps' gradients feed the update at step + a
            for d in _deltas(self._model).values():
                d.accum = torch.zeros(d.numel, device=d.values.device)  # [out*in]

    @torch.no_grad()
    def reselect(self, optimizer=None) -> int:
        """Drop the smallest |deltas|, regrow at the largest |accumulated gradient|; returns #replaced."""
        replaced = 0
        for d in _deltas(self._model).values():
            if d.accum is None:
                continue
            acc = d.accum
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(acc)  # hooks saw the local gradient: agree on one choice
            n = int(self.config.drop_fraction * d.values.numel())
            if n:
                slots = torch.topk(d.values.abs(), n, largest=False, sorted=False).indices  # [n] slots to free
                keep = torch.ones(d.values.numel(), dtype=torch.bool, device=acc.device)
                keep[slots] = False
                score = acc.abs()
                score[d.indices[keep]] = -1.0  # remaining indices cannot be regrown
                grown = torch.topk(score, n, sorted=False).indices  # [n] new flat indices
                d.indices[slots] = grown
                d.values[slots] = 0.0
                state = optimizer.state.get(d.values, {}) if optimizer is not None else {}
                for key in ("exp_avg", "exp_avg_sq"):
                    if isinstance(state.get(key), torch.Tensor):
                        state[key][slots] = 0.0
                replaced += n
            d.accum = None
        return replaced

    # -- state and export --------------------------------------------------------------------------
    def trainable_state_dict(self, model):
        out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        for name, d in _deltas(model).items():
            out[f"{name}.parametrizations.weight.0.indices"] = d.indices
            if d.accum is not None:
                out[f"{name}.parametrizations.weight.0.accum"] = d.accum
        return out

    def load_trainable_state_dict(self, model, state):
        deltas = _deltas(model)
        rest = {}
        with torch.no_grad():
            for key, t in state.items():
                mod, _, leaf = key.partition(".parametrizations.weight.0.")
                if leaf == "indices":
                    deltas[mod].indices.copy_(t)
                elif leaf == "accum":
                    deltas[mod].accum = t.clone().to(deltas[mod].values.device)
                else:
                    rest[key] = t
        super().load_trainable_state_dict(model, rest)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))

    def merged_model(self, model):
        for name, m in list(model.named_modules()):
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return model

    def save_adapter(self, model, directory: str) -> None:
        from safetensors.torch import save_file

        deltas = _deltas(model)
        tensors = {}
        shapes = {}
        for name, d in deltas.items():
            tensors[f"{name}.weight.indices"] = d.indices.detach().cpu().contiguous()
            tensors[f"{name}.weight.values"] = d.values.detach().cpu().contiguous()
            shapes[name] = list(dict(model.named_modules())[name].parametrizations.weight.original.shape)
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(directory) / "sparse_delta.safetensors"))
        meta = {"format": FORMAT, "version": 1, "method": "spiel", "modules": shapes,
                "base_model": getattr(getattr(model, "config", None), "_name_or_path", None)}
        (Path(directory) / "sparse_delta.json").write_text(json.dumps(meta, indent=2) + "\n")
