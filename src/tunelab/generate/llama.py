"""A lean decoding step for the Llama family (llama, mistral, qwen2): transformers' operators, in transformers'
order, on the same weights, without transformers' per-step machinery.

A decoding step of `LlamaForCausalLM.forward` (transformers 5) spends much of its time outside the arithmetic:
the output-capturing and kwargs-merging decorators, `create_causal_mask` (a [B, 1, 1, T] boolean mask rebuilt
every step from the 2-D mask, the cache and the positions), the `Cache.update` dispatch, the attention-interface
lookup, and ~300 `nn.Module.__call__`s per step with their hook checks (10 per layer x 30 layers for SmolLM2).
`LlamaDecoder.step` runs, per layer, exactly the aten operators of transformers' modules (RMSNorm in fp32 then
back, q/k/v projections, rotary embedding with `rotate_half`, the cache write, SDPA with transformers' choice
between grouped-query SDPA and `pack_gqa`'s query layout, the same padding mask, o-projection, SwiGLU MLP,
residual adds), on the same tensors in the same shapes, so its logits are bit-identical to the model's forward;
tests/generate/test_llama_decode.py checks it against the forward and transformers' generate on tiny llama,
mistral, qwen2 and LoRA models, and benchmarks/generation.py on SmolLM2 in bf16.

The decoding mask: in a decoding step the query is the last position, so causality masks nothing; transformers'
mask is the 2-D padding mask as booleans, [B, 1, 1, T], which SDPA turns into an additive one (0 where True,
-inf where False, in the query's dtype) in every layer. Here that additive mask is built once per batch for the
batch's capacity (left padding never changes once the prompt is in the cache) and each step passes a view of
its first T positions: the same values, so the same attention.

PEFT LoRA layers on the projections are applied as PEFT's `lora.Linear.forward` applies them (base output, then
`+ lora_B(lora_A(x)) * scaling` per active adapter; not merged into the weights, which would round differently).
Where the model is anything else (other architectures, LoRA variants such as DoRA, other adapters, hooks, sliding
windows not longer than the batch, other attention implementations, quantised or autocast weights, transformers'
own cache classes), `LlamaDecoder.build` returns None and the engine calls the model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.core.unwrap import unwrap_peft
from tunelab.generate.cache import preallocated_layers

FAMILY = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # model_type -> transformers' class prefix


class _Unsupported(Exception):
    """The model has something the lean step does not reproduce: its forward runs instead."""


def _linear(module: nn.Module) -> tuple:
    """(weight, bias, loras) of a projection: an nn.Linear, or PEFT's LoRA `Linear` (vanilla LoRA, adapters not
    merged: loras = [(A, B, scaling)] of the active adapters, applied as PEFT's forward applies them)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias, ()
    if type(module).__module__ != "peft.tuners.lora.layer" or type(module).__name__ != "Linear":
        raise _Unsupported(type(module).__name__)
    base = module.base_layer
    if type(base) is not nn.Linear:
        raise _Unsupported(f"LoRA over {type(base).__name__}")
    if module.disable_adapters or module.merged:  # PEFT: the base layer alone (merged weights already in it)
        return base.weight, base.bias, ()
    loras = []
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if name in module.lora_variant or type(a) is not nn.Linear or type(b) is not nn.Linear:
            raise _Unsupported("LoRA variant (DoRA, ...)")  # PEFT's variants have their own forward
        if type(drop) not in (nn.Identity, nn.Dropout) or drop.training:
            raise _Unsupported("LoRA dropout in training mode")
        loras.append((a, b, module.scaling[name]))
    return base.weight, base.bias, tuple(loras)


def _check(model: nn.Module, dtype: torch.dtype) -> None:
    """Raises _Unsupported unless `model` is a `{Llama,Mistral,Qwen2}ForCausalLM` with transformers' own modules
    (LoRA layers on its projections allowed), no hooks, SDPA attention and plain weights in `dtype`."""
    cfg = getattr(model, "config", None)
    prefix = FAMILY.get(getattr(cfg, "model_type", ""))
    if prefix is None or type(model).__name__ != f"{prefix}ForCausalLM":
        raise _Unsupported(type(model).__name__)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "pretraining_tp", 1) != 1:
        raise _Unsupported("attention implementation")
    if type(model.model.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        raise _Unsupported("adapted embeddings or head")
    own = {f"{prefix}{name}" for name in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm",
                                          "RotaryEmbedding")} | {"SiLUActivation"}
    containers = (nn.Linear, nn.Embedding, nn.ModuleList, nn.ModuleDict, nn.ParameterDict, nn.Dropout, nn.Identity)
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            raise _Unsupported("forward hooks")
        if type(m).__name__ not in own and type(m) not in containers:
            _linear(m)  # LoRA layers pass; anything else is unsupported
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise _Unsupported("global forward hooks")
    if not all(type(p.data) is torch.Tensor and p.dtype == dtype for p in model.parameters()):
        raise _Unsupported("weights in another dtype or quantised")


def _window_covers(cfg, capacity: int) -> bool:
    """True when every layer attends to all positions of the batch: no sliding window, or one longer than the
    batch's final length (then its mask is the causal one); shorter windows' masks are not rebuilt here."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or window > capacity:
        return True
    types = getattr(cfg, "layer_types", None)
    return types is not None and all(t == "full_attention" for t in types)


class LlamaDecoder:
    """One-token decoding steps of a Llama-family model over the engine's preallocated KV cache.

    Built per batch (`build`), after the prefill has filled `cache`; `step(tokens, positions)` appends one
    position per row and returns the logits of the new tokens, [B, V] fp32, as `ModelStep.decode` does.
    """

    def __init__(self, model: nn.Module, layers: list, pad_mask: torch.Tensor | None):
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = model.lm_head.weight
        self.blocks = []
        for block in inner.layers[: model.config.num_hidden_layers]:
            attn, mlp = block.self_attn, block.mlp
            act = F.silu if type(mlp.act_fn).__name__ == "SiLUActivation" else mlp.act_fn
            self.blocks.append((
                block.input_layernorm.weight, block.input_layernorm.variance_epsilon,
                *(_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)),
                block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon,
                *(_linear(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)), act))
        self.head_dim = model.model.layers[0].self_attn.head_dim
        self.groups = model.model.layers[0].self_attn.num_key_value_groups
        self.scaling = model.model.layers[0].self_attn.scaling
        self.cache_layers = layers
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa  # lazily: transformers imports slowly

        self.use_gqa = use_gqa_in_sdpa
        self.pad_mask = pad_mask  # [B, 1, 1, capacity] additive (0 | -inf), or None when no row is padded

    @classmethod
    def build(cls, model: nn.Module, cache, mask: torch.Tensor | None, capacity: int,
              dtype: torch.dtype) -> LlamaDecoder | None:
        """The lean step for this batch, or None where the model's own forward must run (module docstring).

        `mask` is the batch's 2-D attention mask over `capacity` positions ([B, capacity], 1 = a real token; the
        positions not generated yet are 1), None when no row is padded."""
        model = unwrap_peft(model)
        layers = preallocated_layers(cache)
        if layers is None or len(layers) != model.config.num_hidden_layers:
            return None
        try:
            _check(model, dtype)
            if not _window_covers(model.config, capacity):
                raise _Unsupported("sliding window")
            return cls(model, layers, _additive_mask(mask, dtype, model.lm_head.weight.device))
        except _Unsupported:
            return None

    def select_rows(self, keep: torch.Tensor) -> None:
        """Rows `keep` only (the engine dropped finished rows; the cache was compacted by the engine)."""
        if self.pad_mask is not None:
            self.pad_mask = self.pad_mask[keep.to(self.pad_mask.device)]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1], positions [B, 1] -> logits [B, V] fp32; each cache layer grows by one position."""
        device = self.lm_head.device
        tokens, positions = tokens.to(device), positions.to(device)
        h = self.embed(tokens)  # [B, 1, d]
        cos, sin = self.rotary(h, position_ids=positions)  # [B, 1, D] each, in h's dtype
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]: broadcast over heads
        b, d = h.shape[0], self.head_dim
        length = self.cache_layers[0].length + 1
        mask = None if self.pad_mask is None else self.pad_mask[..., :length]  # [B, 1, 1, T]
        # transformers' sdpa_attention_forward: grouped-query attention inside SDPA where it allows it (no mask),
        # else pack_gqa's layout (one query token: [B, H_kv, groups, D] against the unrepeated keys)
        gqa = self.groups > 1 and self.use_gqa(mask, self.cache_layers[0].keys, self.cache_layers[0].values)
        pack = self.groups > 1 and not gqa
        for (ln1, eps1, q_proj, k_proj, v_proj, o_proj, ln2, eps2, gate, up, down, act), layer in zip(
                self.blocks, self.cache_layers):
            residual = h
            x = _rms_norm(h, ln1, eps1)
            q = _apply(x, q_proj).view(b, 1, -1, d).transpose(1, 2)  # [B, H, 1, D]
            k = _apply(x, k_proj).view(b, 1, -1, d).transpose(1, 2)  # [B, H_kv, 1, D]
            v = _apply(x, v_proj).view(b, 1, -1, d).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys, values = layer.append(k, v)  # [B, H_kv, T, D] views of the cache
            if pack:
                q = q.reshape(b, q.shape[1] // self.groups, self.groups, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0,
                                                 scale=self.scaling, is_causal=False, **({"enable_gqa": True}
                                                                                         if gqa else {}))
            out = out.reshape(b, -1, 1, d).transpose(1, 2).contiguous()  # [B, 1, H, D]
            out = out.reshape(b, 1, -1).contiguous()
            h = residual + _apply(out, o_proj)
            residual = h
            x = _rms_norm(h, ln2, eps2)
            x = _apply(act(_apply(x, gate)) * _apply(x, up), down)
            h = residual + x
        h = _rms_norm(h, self.norm_w, self.norm_eps)
        # transformers' generate: outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        return F.linear(h, self.lm_head)[:, -1].to(copy=True, dtype=torch.float32)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor | None:
    """[B, T] 1/0 -> [B, 1, 1, T] 0/-inf in `dtype`: SDPA's own conversion of a boolean mask
    (convert_boolean_attn_mask: zeros, -inf where False), done once per batch instead of once per layer and step."""
    if mask is None:
        return None
    keep = mask.to(device=device, dtype=torch.bool)[:, None, None]
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def _apply(x: torch.Tensor, proj: tuple) -> torch.Tensor:
    """A projection as nn.Linear / PEFT's LoRA Linear computes it: base, then + B(A(x)) * scaling per adapter
    (dropout is the identity in eval mode; PEFT's input cast is a no-op with every weight in one dtype)."""
    weight, bias, loras = proj
    out = F.linear(x, weight, bias)
    for a, b, scaling in loras:
        out = out + F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * scaling
    return out


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: x / sqrt(mean(x^2) + eps) in fp32, cast back, times the weight (Zhang & Sennrich, 2019)."""
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(h.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (RoPE, Su et al. 2021, as transformers lays it out)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
