"""Per-token log-probs of chosen tokens over a large vocabulary, without the full logits: the ONE implementation
behind the RL objectives' completion log-probs and the preference objectives' sequence log-probs.

    logp_i = z_i[y_i] - logsumexp_v z_i[v],    z_i = (h_i . W^T) / T        (h_i [d], W [V, d], T the temperature)
    H_i    = logsumexp_v z_i - sum_v softmax(z_i)_v z_i[v]                   (entropy; a metric, never differentiated)

`chunked_token_logps(hidden [N, d], weight [V, d], targets [N])` computes logp [N] (and H [N]) chunk by chunk of
tokens, like train/chunked_ce.py's summed cross-entropy, whose per-chunk workspace it shares: the product in the
autocast dtype exactly as `nn.Linear` computes it under autocast, then fp32 for the log-sum-exp. Only one
[chunk, V] block exists at a time, in the forward and in the backward pass, instead of the [N, V] logits, their
fp32 copy and log_softmax's [N, V] output kept for backward. What it keeps for backward is the per-token
log-sum-exp [N] (plus references to hidden and weight); the backward pass recomputes each chunk's logits, since
the upstream gradient is per token (unlike the summed loss, it is not known in the forward pass):

    d logp_i / d z_i = (onehot(y_i) - softmax(z_i)) / T,   then dh = dz W, dW = dz^T h   (per chunk)

`causal_lm_hidden` runs a HF causal LM (under any PEFT / DDP wrapper) with its output projection bypassed and
returns the final hidden states of the requested positions and the projection's weight, or None when the model's
head is not a plain bias-free Linear or it post-processes its logits (then callers compute logits as before).
Values equal `log_softmax(logits.float() / T).gather(targets)` (tests/train/test_token_logps.py, bound 1e-5:
measured fp32 log-probs 1e-6, entropy and gradients 2-4e-6; under bf16 autocast the same bf16 logits, log-probs
within 5e-7; fp64 gradcheck).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tunelab.core.unwrap import unwrap_model, unwrap_peft
from tunelab.train.chunked_ce import (
    _accum_dtype,
    _autocast_dtype,
    _has_logit_postprocessing,
    _no_autocast,
    _plain_lm_head,
    _Workspace,
)

__all__ = ["chunked_token_logps", "causal_lm_hidden"]


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_size: int,
                compute_dtype: torch.dtype, with_entropy: bool):
        n, d = hidden.shape
        vocab = weight.shape[0]
        acc = _accum_dtype(compute_dtype)
        with _no_autocast(hidden.device.type):
            h, w, y = hidden.to(compute_dtype), weight.to(compute_dtype), targets.long()  # [N, d], [V, d], [N]
            lse_all = torch.empty(n, dtype=acc, device=hidden.device)  # [N]
            logps = torch.empty(n, dtype=acc, device=hidden.device)  # [N]
            entropy = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
            if n:
                ws = _Workspace(min(chunk_size, n), vocab, d, compute_dtype, acc, hidden.device, False)
                for start in range(0, n, chunk_size):
                    end = min(start + chunk_size, n)
                    z = ws.logits(h[start:end], w)  # [c, V] fp32
                    if temperature != 1.0:
                        z.div_(temperature)
                    tgt = z.gather(1, y[start:end].unsqueeze(1)).squeeze(1)  # [c]
                    lse = torch.logsumexp(z, dim=1)  # [c]
                    lse_all[start:end] = lse
                    logps[start:end] = tgt - lse
                    if entropy is not None:  # H = lse - sum p z, with p = exp(z - lse)
                        pz = (z - lse.unsqueeze(1)).exp_().mul_(z).sum(1)
                        entropy[start:end] = lse - pz
        ctx.save_for_backward(hidden, weight, y, lse_all)
        ctx.meta = (temperature, chunk_size, compute_dtype)
        entropy = entropy if entropy is not None else logps.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_logps: Tensor, _grad_entropy: Tensor):
        hidden, weight, y, lse_all = ctx.saved_tensors
        temperature, chunk_size, cd = ctx.meta
        acc = _accum_dtype(cd)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = hidden.shape
        grad_h = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if n and (need_h or need_w):
            with _no_autocast(hidden.device.type):
                h, w = hidden.to(cd), weight.to(cd)
                g = grad_logps.to(acc)  # [N]
                ws = _Workspace(min(chunk_size, n), weight.shape[0], d, cd, acc, hidden.device, need_w)
                for i, start in enumerate(range(0, n, chunk_size)):
                    end = min(start + chunk_size, n)
                    z = ws.logits(h[start:end], w)  # [c, V] recomputed fp32 logits
                    if temperature != 1.0:
                        z.div_(temperature)
                    gc = g[start:end] / temperature  # [c]
                    # dz = g (onehot - softmax) / T, built in place over the logits: -softmax * g / T, then + g / T
                    # at the targets
                    p = z.sub_(lse_all[start:end].unsqueeze(1)).exp_().mul_(gc.unsqueeze(1).neg())
                    p[ws.rows[: end - start], y[start:end]] += gc
                    ws.backprop(p, h[start:end], w, None if grad_h is None else grad_h[start:end], grad_w, i == 0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None)


def chunked_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
                        chunk_size: int = 256, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax((hidden @ weight.T) / temperature)[targets] per row: ([N] fp32, entropy [N] fp32 or None).

    hidden [N, d] (final hidden states), weight [V, d] (the bias-free output projection), targets [N] int.
    Under autocast the product runs in the autocast dtype (as the lm_head would), the rest in fp32 (fp64 for
    fp64 inputs). Transient memory: one [chunk_size, V] block in the compute dtype and one in fp32 (two with the
    entropy); 256 tokens, SFT's `objective.chunk_size` default, is ~75 MB for a 49152-token vocabulary."""
    if (hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]
            or hidden.shape[1] != weight.shape[1]):
        raise ValueError(f"expected hidden [N, d], weight [V, d], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    compute = _autocast_dtype(hidden.device.type)
    if compute is None:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    logps, entropy = _ChunkedTokenLogps.apply(hidden, weight, targets, float(temperature), int(chunk_size),
                                              compute, bool(with_entropy))
    return logps, (entropy if with_entropy else None)


def causal_lm_hidden(model: nn.Module, **forward_kwargs: Any) -> tuple[Tensor, Tensor] | None:
    """Run `model(**forward_kwargs)` with its output projection bypassed: (hidden states [B, K, d] where the
    model would return logits [B, K, V] (`logits_to_keep` applies), the projection's weight [V, d]); None when
    the head is not a plain bias-free Linear or the model post-processes logits (then nothing was run)."""
    base = unwrap_peft(unwrap_model(model))
    head = _plain_lm_head(base)
    name = next((n for n, m in base.named_children() if m is head), None) if head is not None else None
    if head is None or name is None or _has_logit_postprocessing(base):
        return None
    setattr(base, name, nn.Identity())
    try:
        hidden = model(**forward_kwargs).logits  # [B, K, d]
    finally:
        setattr(base, name, head)
    return hidden, head.weight
