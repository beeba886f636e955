"""Memory-lean, exact cross-entropy over a large vocabulary.

The plain Hugging Face causal-LM path materialises the full logits ``[tokens, V]``
(in the autocast dtype), upcasts them to fp32 for ``log_softmax`` and keeps both
(plus their gradient) alive until backward.  For SmolLM2-135M (V = 49152) at
4 x 256 tokens that is several hundred MB and ~18 % of the step time.

:func:`chunked_cross_entropy` computes the same summed loss token-chunk by
token-chunk with a custom :class:`torch.autograd.Function`, so at most one
``[chunk_size, V]`` block of logits exists at any time:

* the matmul ``hidden_chunk @ weight.T`` runs in the autocast dtype when autocast
  is enabled for the tensors' device (exactly like ``nn.Linear`` would under
  autocast), otherwise in the inputs' dtype;
* log-sum-exp, the softmax and the loss are always computed in fp32 (fp64 when the
  inputs are fp64), like HF's ``logits.float()`` + ``F.cross_entropy``;
* tokens whose label is ``ignore_index`` are dropped *before* chunking, so
  chunks (and any all-ignored chunks) of ignored tokens cost nothing.

What is saved for backward (default ``grad_in_forward=True``): the gradients
themselves.  Each chunk's softmax is already in hand in the forward pass, so the
forward also computes ``d loss / d hidden`` (``[M, d]``, hidden's dtype) and, if the
weight is trainable, accumulates ``d loss / d weight`` (``[V, d]``, fp32) for a unit
upstream gradient; backward only multiplies them in place by the incoming scalar
``grad_output`` and hands them over.  That is 2 big matmuls per chunk with a frozen
weight (logits, dhidden) and 3 with a trainable one (+ dweight) -- the same as the
naive path -- against 3 / 4 for the alternative (``grad_in_forward=False``), which
saves only the per-token log-sum-exp (``[M]`` fp32) and recomputes every chunk's
logits (and softmax) in backward.  Peak memory is identical for both (the ``[V, d]``
weight gradient must exist at backward time either way; ``[M, d]`` is tiny), so the
precomputing variant wins on time: on the 1024 x 576 x 49152 benchmark
(``benchmarks/chunked_ce.py``) it is ~1.3-1.9x faster than recomputing and at least
as fast as the naive path at chunk_size=1024.  Gradients are only precomputed when
autograd will need them (grad mode on and an input requiring grad), so evaluation
under ``torch.no_grad()`` costs just the loss.  Backward through a retained graph
(``retain_graph=True``, ``gradcheck``) stays correct: the applied scale is tracked.
Numerics under bf16 autocast: the logits and the loss are bit-for-bit those of the
naive path; the gradients agree with it to bf16 rounding (``grad_output`` is applied
after, not before, the bf16 products) and are as accurate w.r.t. exact math.

Memory: per call, one ``[C, V]`` logits/dlogits buffer in the compute dtype and one
``[C, V]`` fp32 buffer (C = min(chunk_size, M)) are allocated and reused by every
chunk, plus the compute-dtype copy of the weight (``[V, d]``, as autocast's cast
would make) and the fp32 weight gradient when trained.  Nothing of size ``[N, V]``
is ever allocated.

:func:`causal_lm_loss` wires this into a HF ``*ForCausalLM`` (optionally wrapped by
PEFT): it runs the backbone only, shifts, and calls :func:`chunked_cross_entropy`
with the ``lm_head`` weight.  :func:`naive_causal_lm_loss` is the reference /
fallback path (full logits, fp32 ``F.cross_entropy``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.unwrap import unwrap_model, unwrap_peft

__all__ = ["chunked_cross_entropy", "causal_lm_loss", "naive_causal_lm_loss"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for ``device_type`` ("cpu"/"cuda"), else None."""
    if device_type not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _accum_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Dtype of log-sum-exp / softmax / loss / weight-grad accumulation: fp32, or fp64 for fp64."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _no_autocast(device_type: str):
    # Inside the Function we cast explicitly; make sure autocast does not re-cast anything.
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


_VBLOCK = 8192  # vocabulary rows per weight-grad block (see _Workspace)


def _keep_graph() -> bool:
    """Whether the running backward keeps its graph (``retain_graph=True``); True when unknown."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if getter is None:  # pragma: no cover - older/newer torch without this (private) query
        return True
    try:
        return bool(getter())
    except Exception:  # pragma: no cover
        return True


class _Workspace:
    """Per-call buffers reused by every chunk (one fresh allocation per call, not per chunk).

    Fresh multi-MB allocations are expensive on CPU (page faults on first touch cost more than
    the elementwise work itself), so the [C, V] blocks are allocated once and overwritten.
    """

    def __init__(self, rows: int, vocab: int, d: int, cd: torch.dtype, acc: torch.dtype, device, need_w: bool):
        self.z = torch.empty(rows, vocab, dtype=cd, device=device)  # [C, V] logits / dlogits, compute dtype
        # [C, V] logits -> exp -> softmax -> dlogits in the accumulation dtype (aliases z when cd == acc)
        self.e = self.z if cd == acc else torch.empty(rows, vocab, dtype=acc, device=device)
        # Per-chunk weight-grad product in compute dtype (CPU has no bf16 x bf16 -> fp32 mm), made
        # [vblock, d] rows at a time so that neither it nor the fp32 upcast that add_ makes of it is [V, d].
        self.vblock = min(vocab, _VBLOCK)
        self.wtmp = torch.empty(self.vblock, d, dtype=cd, device=device) if need_w and cd != acc else None
        self.rows = torch.arange(rows, device=device)  # [C]

    def logits(self, h_c: Tensor, w: Tensor) -> Tensor:
        """h_c [c, d], w [V, d] (compute dtype) -> logits [c, V] in the accumulation dtype."""
        c = h_c.shape[0]
        z = torch.mm(h_c, w.t(), out=self.z[:c])  # [c, V] compute dtype
        if self.e is self.z:
            return z
        return self.e[:c].copy_(z)  # [c, V] fp32

    @staticmethod
    def exp_stats(e: Tensor, y_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In place e <- exp(e - rowmax).  Returns (s [c,1] row sums, lse [c,1], target logit [c,1])."""
        m = e.amax(dim=1, keepdim=True)  # [c, 1]
        tgt = e.gather(1, y_c.unsqueeze(1))  # [c, 1]
        e.sub_(m).exp_()  # [c, V]
        s = e.sum(dim=1, keepdim=True)  # [c, 1]
        return s, m + s.log(), tgt

    def minus_onehot_(self, p: Tensor, y_c: Tensor) -> Tensor:
        """In place p[i, y_i] -= 1 on softmax probabilities p [c, V] -> dloss_i/dlogits_i."""
        p[self.rows[: p.shape[0]], y_c] -= 1.0
        return p

    def backprop(self, p: Tensor, h_c: Tensor, w: Tensor, grad_h_c: Tensor | None, grad_w: Tensor | None, first: bool):
        """p: dloss/dlogits [c, V] (acc dtype).  Writes grad_h_c [c, d] and accumulates grad_w [V, d]."""
        c = p.shape[0]
        g = p if self.e is self.z else self.z[:c].copy_(p)  # [c, V] compute dtype, like the naive bf16 backward
        if grad_h_c is not None:
            if grad_h_c.dtype == g.dtype:
                torch.mm(g, w, out=grad_h_c)  # [c, d]
            else:
                grad_h_c.copy_(torch.mm(g, w))
        if grad_w is not None:
            if self.wtmp is None:  # fp32/fp64 compute: accumulate directly
                if first:
                    torch.mm(g.t(), h_c, out=grad_w)  # [V, d] = [V, c] @ [c, d]
                else:
                    grad_w.addmm_(g.t(), h_c)
            else:  # bf16/fp16 products, fp32 accumulation across chunks, vocabulary block by block
                vocab = grad_w.shape[0]
                for vs in range(0, vocab, self.vblock):
                    ve = min(vs + self.vblock, vocab)
                    tmp = torch.mm(g[:, vs:ve].t(), h_c, out=self.wtmp[: ve - vs])  # [vb, d]
                    if first:
                        grad_w[vs:ve].copy_(tmp)
                    else:
                        grad_w[vs:ve].add_(tmp)


# ---------------------------------------------------------------------------
# autograd Function
# ---------------------------------------------------------------------------


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # [N, d]
        weight: Tensor,  # [V, d]
        labels: Tensor,  # [N] int
        chunk_size: int,
        ignore_index: int,
        compute_dtype: torch.dtype,
        grad_in_forward: bool,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> Tensor:
        device = hidden.device
        acc = _accum_dtype(compute_dtype)
        n_tokens, d = hidden.shape
        vocab = weight.shape[0]
        need_any = need_grad_hidden or need_grad_weight
        grads_now = grad_in_forward and need_any

        ctx.grads_now = grads_now
        ctx.need_grad_hidden = need_grad_hidden
        ctx.need_grad_weight = need_grad_weight
        ctx.hidden_meta = (n_tokens, d, hidden.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.applied_scale = None  # grad_out already multiplied into the stored grads (grads_now)
        ctx.released = False

        with _no_autocast(device.type):
            # Drop ignored tokens up front: only the M valid tokens are ever multiplied, so
            # all-ignored chunks (and ignored tokens inside mixed chunks) cost nothing.
            valid = labels != ignore_index  # [N] bool
            n_valid = int(valid.sum())
            if n_valid == n_tokens:
                idx = None  # nothing to drop
                h = hidden  # [M = N, d]
                y = labels.long()  # [M]
            else:
                idx = valid.nonzero().squeeze(1)  # [M] positions of the valid tokens
                h = hidden.index_select(0, idx)  # [M, d]
                y = labels.index_select(0, idx).long()  # [M]
            h = h.to(compute_dtype)  # [M, d]
            w = weight.to(compute_dtype)  # [V, d], cast once and shared by all chunks

            loss = torch.zeros((), dtype=acc, device=device)
            grad_h = grad_w = lse_all = None
            if grads_now:
                if need_grad_hidden:
                    grad_h = torch.empty(n_valid, d, dtype=hidden.dtype, device=device)  # [M, d]
                if need_grad_weight and n_valid > 0:
                    grad_w = torch.empty(vocab, d, dtype=acc, device=device)  # [V, d] fp32
            elif need_any:
                lse_all = torch.empty(n_valid, dtype=acc, device=device)  # [M] fp32

            if n_valid > 0:
                ws = _Workspace(min(chunk_size, n_valid), vocab, d, compute_dtype, acc, device, grad_w is not None)
                for i, start in enumerate(range(0, n_valid, chunk_size)):
                    end = min(start + chunk_size, n_valid)
                    h_c, y_c = h[start:end], y[start:end]  # [c, d], [c]
                    e = ws.logits(h_c, w)  # [c, V] fp32 logits
                    s, lse, tgt = ws.exp_stats(e, y_c)  # e <- exp(logits - max)
                    loss += (lse - tgt).sum()
                    if lse_all is not None:
                        lse_all[start:end] = lse.squeeze(1)
                    if grads_now:
                        p = ws.minus_onehot_(e.div_(s), y_c)  # [c, V] softmax - onehot
                        ws.backprop(p, h_c, w, None if grad_h is None else grad_h[start:end], grad_w, i == 0)
                del ws
            elif grads_now and need_grad_weight:
                grad_w = torch.zeros(vocab, d, dtype=acc, device=device)

        ctx.idx = idx
        ctx.grad_h, ctx.grad_w = grad_h, grad_w  # None unless grads_now
        if lse_all is not None:
            ctx.save_for_backward(hidden, weight, y, lse_all)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # grad_out: [] (the loss is a scalar)
        n_tokens, d, h_dtype = ctx.hidden_meta
        idx = ctx.idx
        grad_hidden = grad_weight = None

        if ctx.grads_now:
            # Gradients were computed in forward for grad_out == 1: scale them in place (no fresh
            # [V, d] allocation).  If the graph is retained, remember the scale so that a later
            # backward through the same graph rescales correctly.
            if ctx.released:
                raise RuntimeError("chunked_cross_entropy: backward called twice on a graph that was not retained")
            go = grad_out.detach()
            prev = ctx.applied_scale
            if prev is None:
                factor = go
            elif bool(prev == 0):
                raise RuntimeError(
                    "chunked_cross_entropy: cannot re-run backward after a zero grad_output "
                    "(use grad_in_forward=False)"
                )
            else:
                factor = go / prev
            for name in ("grad_h", "grad_w"):
                t = getattr(ctx, name)
                if t is not None and not bool(factor == 1):
                    t.mul_(factor.to(t.dtype))
            ctx.applied_scale = go.clone()
            gh_valid, gw = ctx.grad_h, ctx.grad_w
            if not _keep_graph():  # let autograd take ownership (it may then reuse the buffer as .grad)
                ctx.grad_h = ctx.grad_w = None
                ctx.released = True
            if gw is not None:
                grad_weight = gw.to(ctx.weight_dtype)
        else:
            hidden, weight, y, lse_all = ctx.saved_tensors
            cd = ctx.compute_dtype
            acc = _accum_dtype(cd)
            n_valid = y.shape[0]
            with _no_autocast(hidden.device.type):
                go = grad_out.to(acc)
                gh_valid = (
                    torch.empty(n_valid, d, dtype=h_dtype, device=hidden.device) if ctx.need_grad_hidden else None
                )
                gw = None
                if n_valid > 0:
                    h = hidden if idx is None else hidden.index_select(0, idx)
                    h = h.to(cd)  # [M, d]
                    w = weight.to(cd)  # [V, d]
                    if ctx.need_grad_weight:
                        gw = torch.empty(weight.shape, dtype=acc, device=weight.device)  # [V, d]
                    ws = _Workspace(min(ctx.chunk_size, n_valid), weight.shape[0], d, cd, acc, hidden.device,
                                    gw is not None)
                    for i, start in enumerate(range(0, n_valid, ctx.chunk_size)):
                        end = min(start + ctx.chunk_size, n_valid)
                        h_c, y_c = h[start:end], y[start:end]
                        e = ws.logits(h_c, w)  # [c, V] recomputed fp32 logits
                        p = e.sub_(lse_all[start:end].unsqueeze(1)).exp_()  # [c, V] softmax
                        p = ws.minus_onehot_(p, y_c).mul_(go)  # [c, V] dloss/dlogits (scaled before rounding)
                        ws.backprop(p, h_c, w, None if gh_valid is None else gh_valid[start:end], gw, i == 0)
                    del ws
                elif ctx.need_grad_weight:
                    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
                if gw is not None:
                    grad_weight = gw.to(ctx.weight_dtype)

        if ctx.need_grad_hidden:
            if idx is None:
                grad_hidden = gh_valid.to(h_dtype)  # [N, d]
            else:  # scatter the valid rows back; ignored tokens get zero gradient
                grad_hidden = torch.zeros(n_tokens, d, dtype=h_dtype, device=gh_valid.device)
                grad_hidden.index_copy_(0, idx, gh_valid.to(h_dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    grad_in_forward: bool = True,
) -> Tensor:
    """Summed token cross-entropy of ``hidden @ weight.T`` against ``labels``, without full logits.

    Args:
        hidden: ``[N, d]`` final hidden states (already shifted for causal LM).
        weight: ``[V, d]`` output projection (``lm_head.weight``; no bias).
        labels: ``[N]`` integer targets; ``ignore_index`` entries contribute nothing.
        chunk_size: tokens per chunk.  Under bf16 autocast the transient memory is
            ``chunk_size * V * (2 + 4)`` bytes (bf16 logits/dlogits + fp32 softmax buffers) plus the
            bf16 copy of ``weight`` (``V * d * 2``) and, if ``weight`` is trained, its fp32 gradient.
        ignore_index: label value to ignore.
        grad_in_forward: compute gradients during forward (default, fewest matmuls) instead of
            saving the per-token log-sum-exp and recomputing the logits in backward.

    Returns:
        0-dim fp32 tensor (fp64 for fp64 inputs): the SUM over non-ignored tokens of
        ``logsumexp(logits_i) - logits_i[labels_i]``; equal to
        ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction="sum")``.
        The caller normalises (e.g. by the number of non-ignored tokens).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected hidden [N, d], weight [V, d], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")

    device_type = hidden.device.type
    compute_dtype = _autocast_dtype(device_type)
    if compute_dtype is None or not hidden.is_floating_point():
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    return _ChunkedCrossEntropy.apply(
        hidden, weight, labels, int(chunk_size), int(ignore_index), compute_dtype, bool(grad_in_forward), need_h, need_w
    )


# ---------------------------------------------------------------------------
# causal-LM wrappers
# ---------------------------------------------------------------------------


def _plain_lm_head(base: nn.Module) -> nn.Linear | None:
    """The output projection if it is a plain bias-free ``nn.Linear`` usable by the chunked path, else None."""
    get_out = getattr(base, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(base, "lm_head", None)
    if head is None or type(head) is not nn.Linear:  # PEFT LoRA / ModulesToSave wrappers are not nn.Linear
        return None
    try:  # a LoRA-wrapped lm_head (peft BaseTunerLayer) -> naive path
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(head, BaseTunerLayer):  # pragma: no cover - not nn.Linear anyway
            return None
    except ImportError:  # pragma: no cover
        pass
    if head.bias is not None:
        return None
    if getattr(head.weight, "ds_id", None) is not None:
        # DeepSpeed ZeRO-3 gathers a weight only inside its own module's forward (it is an empty partition outside
        # it), and the chunked loss applies it outside: call the module (the naive path) instead
        return None
    return head


def _has_logit_postprocessing(base: nn.Module) -> bool:
    """Models that transform logits after the lm_head (softcapping / scaling) need the naive path."""
    cfg = getattr(base, "config", None)
    if cfg is None:
        return False
    get_text = getattr(cfg, "get_text_config", None)
    cfg = get_text() if callable(get_text) else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        val = getattr(cfg, attr, None)
        if val not in (None, 1, 1.0, 0, 0.0):
            return True
    return False


def _shift(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """labels [B, T] -> (shift_labels [B*(T-1)], n_tokens [] int64)."""
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    return shift_labels, (shift_labels != ignore_index).sum()


def naive_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int = 1024,  # unused; same signature as causal_lm_loss
    ignore_index: int = -100,
    **forward_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Reference path: full logits via ``model(...)``, fp32 ``F.cross_entropy`` (reduction="sum").

    input_ids / attention_mask / labels: [B, T].  Returns (loss_sum [] fp32, n_tokens [] int64),
    where position t's logits predict labels[:, t + 1].
    """
    del chunk_size
    forward_kwargs.setdefault("use_cache", False)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    logits = out.logits  # [B, T, V] (autocast dtype under autocast)
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # [B*(T-1), V] fp32
    shift_labels, n_tokens = _shift(labels, ignore_index)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss, n_tokens


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    **forward_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Causal-LM loss through the backbone + :func:`chunked_cross_entropy` (full logits never built).

    ``model`` is a HF ``*ForCausalLM`` or a PEFT ``PeftModel`` around one.  input_ids /
    attention_mask / labels: [B, T]; labels use ``ignore_index`` for masked positions and are
    *not* pre-shifted (hidden[:, t] predicts labels[:, t + 1], as in HF).  Returns
    (loss_sum [] fp32, n_tokens [] int64); normalise with ``loss_sum / n_tokens`` (or by a
    global token count under gradient accumulation).

    Falls back to :func:`naive_causal_lm_loss` when the lm_head is not a plain bias-free
    ``nn.Linear`` (e.g. LoRA on ``lm_head``) or the model post-processes its logits.
    """
    base = unwrap_peft(unwrap_model(model))  # the HF model under DDP / DeepSpeed's engine and PEFT
    head = _plain_lm_head(base)
    head_name = next((n for n, m in base.named_children() if m is head), None) if head is not None else None
    if head is None or head_name is None or _has_logit_postprocessing(base):
        return naive_causal_lm_loss(
            model, input_ids, attention_mask, labels, ignore_index=ignore_index, **forward_kwargs
        )

    # Run the WHOLE model (through any DDP / PEFT wrapper, so their forward hooks run) with the output
    # projection bypassed: its "logits" are then the final hidden states [B, T, d], and the projection is
    # applied chunk by chunk inside the loss instead.
    forward_kwargs.setdefault("use_cache", False)
    setattr(base, head_name, nn.Identity())
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    finally:
        setattr(base, head_name, head)
    hidden = out.logits  # [B, T, d]
    if hidden.shape[-1] != head.weight.shape[1]:  # pragma: no cover - a model that post-processes hidden states
        raise RuntimeError("bypassing the lm_head did not return hidden states; use the naive loss")
    shift_hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])  # [B*(T-1), d]
    shift_labels, n_tokens = _shift(labels, ignore_index)  # [B*(T-1)], []
    loss = chunked_cross_entropy(
        shift_hidden, head.weight, shift_labels, chunk_size=chunk_size, ignore_index=ignore_index
    )
    return loss, n_tokens
