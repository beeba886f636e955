"""LoReFT: low-rank linear subspace representation fine-tuning.

Wu et al. 2024, https://arxiv.org/abs/2404.03592. Update rule (on a decoder layer's output h [d] at the chosen
positions): h <- h + R^T (W h + b - R h), with R [r, d] having orthonormal rows (R R^T = I), W [r, d], b [r];
only R, W, b train, the model's weights stay frozen.

R is kept orthonormal by `torch.nn.utils.parametrizations.orthogonal` (as pyreft does). Its default map for a
non-square matrix is Householder, which we saw collapse to R = 0 at lr 0.1 on a 4x64 matrix; "cayley" (default
here) and "matrix_exp" stay orthonormal to ~1e-6. Both act on a d x d matrix per forward; the trivialisation
keeps a d x d `base` buffer, which checkpoints carry (it is part of R's value).

Defaults: W = R and b = 0, so the intervention starts as the identity and the model unchanged (pyreft draws
W, b at random, which perturbs the model before training; `start_unchanged: false` does that); r = 4 at every
layer (`layers: null`) and every position (`positions: "all"`). The paper intervenes on the first p and last s
PROMPT tokens ("f7+l7"), but tunelab's SFT objective does not pass the prompt/answer boundary to the model, and
"all" is consistent between training and cached generation. `positions: "f<k>"` intervenes on the first k
non-padding tokens of each sequence (found from the attention mask, so it also holds with left padding and a
KV cache). The intervention runs in fp32 outside autocast (R's orthogonality). No weight decay (it would pull W
towards 0, while the neutral intervention is W = R).
Per layer: 2 r d + r parameters.

Not mergeable (the edit depends on h, not on a weight): merged export raises ExportUnsupported. The adapter
export writes R, W, b in tunelab's own safetensors format (PEFT cannot load it).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from tunelab.methods._modules import load_named_tensors, resolve_layers, save_own_adapter
from tunelab.methods.registry import Capabilities, ExportUnsupported, Method, MethodOptions, register

NOT_MERGEABLE = ("loreft: the intervention h + R^T(W h + b - R h) edits hidden states at chosen positions; it is "
                 "not a weight edit and cannot be merged. Use the adapter export (tunelab's own format: PEFT cannot "
                 "load it; re-apply with tunelab.methods._modules.load_own_adapter)")


class LoReFTIntervention(torch.nn.Module):
    def __init__(self, d: int, r: int, orthogonal_map: str = "cayley", start_unchanged: bool = True):
        super().__init__()
        from torch.nn.utils.parametrizations import orthogonal

        # R = rotate.weight [r, d], rows orthonormal; W = learned_source.weight [r, d], b = learned_source.bias [r]
        self.rotate = orthogonal(torch.nn.Linear(d, r, bias=False), orthogonal_map=orthogonal_map)
        self.learned_source = torch.nn.Linear(d, r)
        if start_unchanged:  # W = R, b = 0: W h + b - R h = 0, the intervention starts as the identity
            with torch.no_grad():
                self.learned_source.weight.copy_(self.rotate.weight)
                self.learned_source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            hf = h.float()  # [..., d]
            R = self.rotate.weight  # [r, d]
            delta = (self.learned_source(hf) - hf @ R.T) @ R  # [..., r] @ [r, d] -> [..., d]
            return (hf + delta).to(h.dtype)


class LoReFTOptions(MethodOptions):
    r: int = Field(4, ge=1, description="Rank of the intervened subspace.")
    layers: list[int] | None = Field(None, description="Decoder layers whose output is intervened on "
                                                       "(negative = from the top); None = all.")
    positions: str = Field("all", description="'all', or 'f<k>': the first k non-padding tokens of each sequence.")
    orthogonal_map: Literal["cayley", "matrix_exp", "householder"] = Field(
        "cayley", description="How torch keeps R orthonormal.")
    start_unchanged: bool = Field(True, description="Init W = R, b = 0 (identity at step 0); False = pyreft's "
                                                    "random W, b.")

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: str) -> str:
        if not re.fullmatch(r"all|f[1-9]\d*", v):
            raise ValueError("positions must be 'all' or 'f<k>' (first k tokens), e.g. 'f3'")
        return v


def position_mask(seq_len: int, attention_mask: torch.Tensor | None, first_k: int,
                  cache_position: torch.Tensor | None = None) -> torch.Tensor:
    """[B or 1, T] bool: which of the current T positions are among the first k real tokens of their sequence.

    attention_mask [B, T_total] covers the cached tokens too (generation), so the current tokens are its last T
    columns and a token's index among the real tokens is cumsum(mask) - 1 (left padding included).
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        m = attention_mask.long()
        idx = (m.cumsum(-1) - 1)[:, -seq_len:]  # [B, T]
        return (m[:, -seq_len:] > 0) & (idx < first_k)
    if cache_position is None:
        cache_position = torch.arange(seq_len)
    return (cache_position.view(1, -1) < first_k)


@register("loreft", paper="https://arxiv.org/abs/2404.03592")
class LoReFT(Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "low-rank interventions R, W, b on the layers' hidden states"
    mergeable = False
    adapter_format = "tunelab"
    Config = LoReFTOptions

    def __init__(self, config=None):
        super().__init__(config)
        self._ctx: dict = {}
        self._handles: list = []

    def _decoder_layers(self, model) -> torch.nn.ModuleList:
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        return inner.layers

    def prepare(self, model):
        c = self.config
        model.requires_grad_(False)
        layers = self._decoder_layers(model)
        wanted = resolve_layers(model, c.layers)
        d = int(model.config.hidden_size)
        first_k = None if c.positions == "all" else int(c.positions[1:])
        device = next(model.parameters()).device
        self._handles = [model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        for i, layer in enumerate(layers):
            if wanted is not None and i not in wanted:
                continue
            # fp32 whatever the model dtype
            layer.reft = LoReFTIntervention(d, c.r, c.orthogonal_map, c.start_unchanged).to(device)
            self._handles.append(layer.register_forward_hook(self._make_hook(layer.reft, first_k)))
        return model

    def _capture(self, module, args, kwargs):
        # the top-level forward's attention mask [B, T_total] (and cache positions), for the position rule
        self._ctx["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._ctx["cache_position"] = kwargs.get("cache_position")

    def _make_hook(self, reft: LoReFTIntervention, first_k: int | None):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # [B, T, d]
            new = reft(h)
            if first_k is not None:
                sel = position_mask(h.shape[1], self._ctx.get("mask"), first_k, self._ctx.get("cache_position"))
                new = torch.where(sel.to(h.device)[..., None], new, h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def param_groups(self, model, weight_decay):
        # no weight decay: the neutral intervention is W = R, b = 0, not W = 0; R's parameter is unconstrained
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]

    def trainable_state_dict(self, model):
        # parameters AND the orthogonal parametrisation's `base` buffer: R = f(original, base)
        return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if ".reft." in n}

    def load_trainable_state_dict(self, model, state):
        load_named_tensors(model, state)

    def merged_model(self, model):
        raise ExportUnsupported(NOT_MERGEABLE)

    def save_adapter(self, model, directory: str) -> None:
        tensors = {}
        for i, layer in enumerate(self._decoder_layers(model)):
            if hasattr(layer, "reft"):
                tensors[f"layers.{i}.R"] = layer.reft.rotate.weight.detach()  # [r, d]
                tensors[f"layers.{i}.W"] = layer.reft.learned_source.weight.detach()  # [r, d]
                tensors[f"layers.{i}.b"] = layer.reft.learned_source.bias.detach()  # [r]
        save_own_adapter(directory, self, model, tensors, {"rule": "h + R^T (W h + b - R h)"})

    @torch.no_grad()
    def load_adapter_tensors(self, model, tensors):
        for i, layer in enumerate(self._decoder_layers(model)):
            if hasattr(layer, "reft"):
                layer.reft.rotate.weight = tensors[f"layers.{i}.R"].to(layer.reft.learned_source.weight)
                layer.reft.learned_source.weight.copy_(tensors[f"layers.{i}.W"])
                layer.reft.learned_source.bias.copy_(tensors[f"layers.{i}.b"])

    def remove(self, model) -> None:
        """Detach the hooks and interventions (the model becomes the plain base model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self._decoder_layers(model):
            if hasattr(layer, "reft"):
                del layer.reft
