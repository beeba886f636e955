"""Causal attention for CPU training: bf16 matmuls, fp32 softmax, one saved probability matrix.

The same maths as three batched matmuls inside one autograd Function, so that only the bf16 probabilities
are kept for the backward pass (not the fp32 scores, the fp32 softmax output and a bf16 copy, as composing
the ops would keep). Measured on a quiet 2-core AVX-512-bf16 EPYC: in the SmolLM2-135M LoRA step it gives
713 tokens/s against 630 with sdpa (`benchmarks/train_throughput.py --ablate`), for ~85 MB more peak RSS;
in isolation, one layer's forward + backward, sdpa's CPU flash kernel is faster (13.0 ms vs 16.5 ms,
`benchmarks/engine_levers.py`), so the gain comes from how it sits in the model, not from the kernel alone.

Grouped-query attention without copying keys: the G query heads that share a key/value head are
stacked along the sequence axis, q [B, Hkv, G*T, D], so one matmul against k [B, Hkv, T, D] serves the
whole group and dK, dV come out summed over the group.

Forward (per key/value head, q rows r = g*T + i, i the query position):
    S = q k^T * scale            [B, Hkv, G*T, T]  (bf16 matmul, fp32 accumulate)
    P = softmax(S + mask)        fp32, stored as bf16
    O = P v                      [B, Hkv, G*T, D]
Backward:  dV = P^T dO,  dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),  dQ = scale dS k,  dK = scale dS^T q.

Registered with transformers' AttentionInterface as `tunelab`, with sdpa's mask builder, so packed rows
(position ids restarting at 0) get the block-diagonal causal mask, and padding masks work as with sdpa.
Packed batches from `tunelab.data.batching.collate_packed` also carry where each document sits
(`document_index` [S, L], `document_slot` [R*W]); with them the kernel attends document by document, S rows
of L tokens under a causal mask, instead of over whole rows of W tokens under the block-diagonal mask: the
same outputs (every other score is masked to probability 0), with attention work and saved probabilities
that grow as the documents' lengths squared, not the row's (a padding-free row of 4 x 512 tokens: 4 x 512^2
scores, not 2048^2).
"""

from __future__ import annotations

import torch

NAME = "tunelab"


def _keep_mask(attention_mask: torch.Tensor | None, t_q: int, t_k: int, device) -> torch.Tensor:
    """Boolean [B or 1, 1, T_q, T_k] mask, True = may attend (sdpa's convention, or causal when None)."""
    if attention_mask is None:
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0  # additive float mask: 0 where allowed, -inf (or min) elsewhere


class GroupedCausalAttention(torch.autograd.Function):
    """q [B, Hkv, G*T, D], k/v [B, Hkv, T, D], keep [B|1, 1, G*T, T] bool -> o [B, Hkv, G*T, D]."""

    @staticmethod
    def forward(ctx, q, k, v, keep, scale: float):
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
        scores.masked_fill_(~keep, torch.finfo(torch.float32).min)  # finite: a fully masked row stays finite
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        del scores
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).float()
        p = probs.float()
        grad_scores = p * (grad_probs - (grad_probs * p).sum(-1, keepdim=True))
        grad_scores = grad_scores.mul_(ctx.scale).to(q.dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None


def grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """query [B, H, T, D], key/value [B, Hkv, T_k, D] -> [B, T, H, D] (the layout HF's o_proj expects)."""
    b, h, t, d = query.shape
    hkv, t_k = key.shape[1], key.shape[2]
    g = h // hkv
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q = query.to(dtype).reshape(b, hkv, g * t, d)
    k, v = key.to(dtype), value.to(dtype)
    keep = _keep_mask(attention_mask, t, t_k, query.device)  # [B|1, 1, T, T_k]
    keep = keep.expand(keep.shape[0], hkv, t, t_k).repeat(1, 1, g, 1) if g > 1 else keep
    with torch.autocast("cpu", enabled=False):
        out = GroupedCausalAttention.apply(q, k, v, keep, scale)  # [B, Hkv, G*T, D]
    return out.view(b, hkv, g, t, d).reshape(b, h, t, d).transpose(1, 2)


def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, document_index: torch.Tensor,
                       document_slot: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed rows attended document by document -> [R, W, H, D] (HF's layout).

    query [R, H, W, D], key/value [R, Hkv, W, D]; document_index [S, L]: the flat position (row * W + column) of
    each document's tokens (short documents repeat a position in their tail, slots whose outputs are dropped);
    document_slot [R*W]: the slot s * L + t of each flat position. Gradients flow back through both gathers.
    """
    r, h, w, d = query.shape
    s, longest = document_index.shape

    def by_document(x: torch.Tensor) -> torch.Tensor:  # [R, Hx, W, D] -> [S, Hx, L, D]
        return x.transpose(1, 2).reshape(r * w, x.shape[1], d)[document_index].transpose(1, 2)

    out = grouped_causal_attention(by_document(query), by_document(key), by_document(value), None, scale)
    return out.reshape(s * longest, h, d)[document_slot].view(r, w, h, d)  # [S, L, H, D] -> [R, W, H, D]


def tunelab_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """transformers AttentionInterface signature; falls back to sdpa where this kernel does not apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (dropout > 0 and module.training) or kwargs.get("softcap") is not None or query.device.type != "cpu" \
            or query.shape[2] == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    index, slot = kwargs.get("document_index"), kwargs.get("document_slot")
    if index is not None and slot is not None and key.shape[2] == query.shape[2]:  # packed rows, no KV cache
        return document_attention(query, key, value, index, slot, scale), None
    return grouped_causal_attention(query, key, value, attention_mask, scale), None


def register() -> str:
    """Make `attn_implementation="tunelab"` available to transformers models; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, tunelab_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
