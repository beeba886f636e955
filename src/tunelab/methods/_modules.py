"""Shared pieces of tunelab's own (non-PEFT) methods.

- `target_linears`: the nn.Linear modules a method adapts, matched by name suffix like PEFT's
  `target_modules` (or "all-linear": every linear but the output embedding), optionally only in some layers;
- `FoldableWrapper`: a module wrapping one nn.Linear (`.base`) that can fold itself back into a plain
  layer (`fold()`), or raises ExportUnsupported where the change is not a weight edit; `fold_wrappers`
  replaces every wrapper by its folded layer;
- `plan_bias_config` / `apply_bias_config` (`sync_bias_config` = both): biases added to the linears of an
  architecture without them (Llama) must be declared in the config (`attention_bias` / `mlp_bias`), or
  `from_pretrained` drops them; the flags are set and the group's other linears get zero biases, or
  ExportUnsupported is raised (before anything changes) when the architecture has no switch for them;
- tunelab's own adapter format: `tunelab_adapter.safetensors` + `tunelab_adapter.json` (method name and
  options). PEFT cannot load it; `load_own_adapter(model, directory)` re-applies it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from tunelab.methods.registry import ExportUnsupported

ADAPTER_WEIGHTS = "tunelab_adapter.safetensors"
ADAPTER_CONFIG = "tunelab_adapter.json"
FORMAT_NOTE = ("tunelab's own adapter format (not PEFT: peft.PeftModel cannot load it); re-apply with "
               "tunelab.methods._modules.load_own_adapter(model, directory)")

# Llama-family config switches for linear biases and the linears each one governs
BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        targets = [targets]
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


def resolve_layers(model: nn.Module, layers: Iterable[int] | None) -> set[int] | None:
    """Layer indices (negative = from the top) -> a set of non-negative indices; None = every layer."""
    if layers is None:
        return None
    n = int(model.config.num_hidden_layers)
    out = set()
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"layer {i} out of range for a model of {n} layers")
        out.add(i % n)
    return out


def target_linears(model: nn.Module, targets: list[str] | str, layers: Iterable[int] | None = None,
                   method: str = "") -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear whose name ends with a target (PEFT's rule); lm_head is never taken."""
    wanted = resolve_layers(model, layers)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is out_emb or name.endswith(".base"):
            continue  # exact nn.Linear only: never a wrapper's inner layer or a PEFT layer
        if _matches(name, targets) and (wanted is None or layer_of(name) in wanted):
            found.append((name, mod))
    if not found:
        raise ValueError(f"method {method}: target_modules {targets!r} match no nn.Linear of the model")
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


class FoldableWrapper(nn.Module):
    """Wraps one nn.Linear as `.base` (frozen); `fold()` returns a plain layer computing the same function."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `module.weight` (dtype/device checks)
        return self.base.weight

    @property
    def fold_has_bias(self) -> bool:
        """Whether the folded layer has a bias (declared in the config before folding)."""
        return self.base.bias is not None

    def fold(self) -> nn.Module:
        raise ExportUnsupported(f"{type(self).__name__} cannot be folded into the weights")


def wrap_targets(model: nn.Module, targets: list[tuple[str, nn.Linear]], factory) -> list[str]:
    """Replace each (name, linear) by factory(linear); returns the names."""
    for name, lin in targets:
        set_module(model, name, factory(lin))
    return [n for n, _ in targets]


def fold_wrappers(model: nn.Module) -> nn.Module:
    """Fold every FoldableWrapper back into a plain layer (in place), and declare new biases in the config.

    Everything that can refuse (an unfoldable wrapper, biases the architecture cannot declare) is checked before
    the model is changed.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, FoldableWrapper)]
    flags = plan_bias_config(model, {n for n, m in wrappers if m.fold_has_bias})
    folded = [(n, m.fold()) for n, m in wrappers]
    for name, layer in folded:
        set_module(model, name, layer)
    apply_bias_config(model, flags)
    return model


def plan_bias_config(model: nn.Module, will_have_bias: set[str] = frozenset()) -> list[str]:
    """The config flags to switch on so that every linear bias (present, or in `will_have_bias`) survives a
    save_pretrained / from_pretrained round trip; raises ExportUnsupported if the architecture cannot declare one.

    Llama-style configs switch biases per group (`attention_bias`: q,k,v,o; `mlp_bias`: gate,up,down). The check is
    a model built on the meta device from the amended config: each bias must be one of its parameters.
    """
    biased = set(will_have_bias)
    for n, m in model.named_modules():
        lin = m.base if isinstance(m, FoldableWrapper) else m
        if type(lin) is nn.Linear and lin.bias is not None and not n.endswith(".base"):
            biased.add(n)
    cfg = copy.deepcopy(model.config)
    flags = [flag for flag, leaves in BIAS_FLAGS.items()
             if hasattr(cfg, flag) and not getattr(cfg, flag) and any(n.rsplit(".", 1)[-1] in leaves for n in biased)]
    for flag in flags:
        setattr(cfg, flag, True)
    with torch.device("meta"):
        expected = set(type(model)(cfg).state_dict())
    lost = sorted(f"{n}.bias" for n in biased if f"{n}.bias" not in expected)
    if lost:
        raise ExportUnsupported(
            f"{type(model).__name__} has no config switch for the biases {lost[:3]}{' ...' if len(lost) > 3 else ''}"
            "; a merged checkpoint would silently lose them. Export the adapter instead, or target linears that "
            "already have biases")
    return flags


def apply_bias_config(model: nn.Module, flags: list[str]) -> None:
    """Set the flags; the group's linears without a bias get a zero one (the function is unchanged)."""
    for flag in flags:
        for n, m in model.named_modules():
            if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in BIAS_FLAGS[flag] and m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
        setattr(model.config, flag, True)


def sync_bias_config(model: nn.Module) -> list[str]:
    """Declare the model's linear biases in its config (see plan_bias_config); returns the flags set."""
    flags = plan_bias_config(model)
    apply_bias_config(model, flags)
    return flags


# -- tunelab's own adapter format ------------------------------------------------------------------------------

def save_own_adapter(directory: str | Path, method, model: nn.Module, tensors: dict[str, torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
    """tensors -> tunelab_adapter.safetensors; method name/options/base model -> tunelab_adapter.json."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(d / ADAPTER_WEIGHTS))
    cfg = getattr(model, "config", None)
    meta = {"format": "tunelab-adapter", "version": 1, "note": FORMAT_NOTE, "method": method.name,
            "paper": method.paper, "options": method.config.model_dump(),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None), **(extra or {})}
    (d / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_own_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{d} is not a tunelab adapter (no {ADAPTER_CONFIG})")
    return json.loads((d / ADAPTER_CONFIG).read_text()), load_file(str(d / ADAPTER_WEIGHTS))


def load_own_adapter(model: nn.Module, directory: str | Path):
    """Apply a saved tunelab adapter to a base model: returns (method, prepared model with the trained tensors)."""
    from tunelab.methods.registry import build_method

    meta, tensors = read_own_adapter(directory)
    method = build_method(meta["method"], meta["options"])
    model = method.prepare(model)
    method.load_adapter_tensors(model, tensors)
    return method, model


class OwnAdapterMixin:
    """save_adapter/load_adapter_tensors in tunelab's format, from the trainable state (exact round trip)."""

    adapter_format = "tunelab"

    def save_adapter(self, model, directory: str) -> None:
        save_own_adapter(directory, self, model, self.trainable_state_dict(model))

    def load_adapter_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        self.load_trainable_state_dict(model, tensors)


def load_named_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into parameters OR buffers by name (the default loader knows parameters only)."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    missing = [n for n in state if n not in named]
    if missing:
        raise KeyError(f"checkpoint has tensors the model lacks: {missing[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            named[n].copy_(t)


def reset_optimizer_state(optimizer, params: Iterable[torch.Tensor]) -> int:
    """Zero the optimizer's per-parameter state (Adam moments, step) of `params`; returns how many had state."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    n = 0
    for p in params:
        st = opt.state.get(p)
        if not st:
            continue
        n += 1
        for k, v in st.items():
            if torch.is_tensor(v):
                v.zero_()
            elif isinstance(v, (int, float)):
                st[k] = type(v)(0)
    return n
