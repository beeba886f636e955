"""chunked_token_logps (train/token_logps.py) against the unchunked computation: log_softmax of the full logits,
values, entropy and gradients, with chunks that do not divide the tokens, a temperature, and bf16 autocast."""

from __future__ import annotations

import torch

from tunelab.train.token_logps import causal_lm_hidden, chunked_token_logps


def reference(h, w, y, temperature=1.0):
    logits = (h @ w.t()).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def inputs(n=37, d=16, v=100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=dtype)  # a per-token upstream gradient
    return h, w, y, up


def test_values_entropy_and_gradients_equal_the_full_logits():
    h, w, y, up = inputs()
    ref, ref_ent = reference(h, w, y, 0.7)
    (ref * up).sum().backward()
    gh_ref, gw_ref = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out, ent = chunked_token_logps(h, w, y, temperature=0.7, chunk_size=8, with_entropy=True)
    (out * up).sum().backward()
    d_val = (out - ref).abs().max().item()
    d_ent = (ent - ref_ent).abs().max().item()
    d_h = (h.grad - gh_ref).abs().max().item()
    d_w = (w.grad - gw_ref).abs().max().item()
    print(f"fp32: max |logp diff| {d_val:.2e}, entropy {d_ent:.2e}, dhidden {d_h:.2e}, dweight {d_w:.2e}")
    assert d_val < 1e-5 and d_ent < 1e-5 and d_h < 1e-5 and d_w < 1e-5
    assert not ent.requires_grad and out.dtype == torch.float32


def test_gradcheck_fp64():
    h, w, y, _ = inputs(n=6, d=4, v=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: chunked_token_logps(a, b, y, temperature=1.3, chunk_size=4)[0],
                                    (h, w))


def test_frozen_weight_gets_no_gradient_and_bf16_values_match():
    h, w, y, up = inputs()
    w = w.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = chunked_token_logps(h, w, y, chunk_size=5)
        ref_logits = torch.nn.functional.linear(h, w)  # the lm_head under autocast: bf16
    ref = torch.log_softmax(ref_logits.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    diff = (out - ref).abs().max().item()
    print(f"bf16 autocast: max |logp diff| {diff:.2e}")
    assert diff < 1e-5  # the same bf16 logits; log_softmax vs gather - logsumexp differ by fp32 rounding
    (out * up).sum().backward()
    assert h.grad is not None and w.grad is None


def test_causal_lm_hidden_is_the_lm_heads_input(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    hidden, weight = causal_lm_hidden(tiny_model, input_ids=ids, use_cache=False)
    logits = tiny_model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(hidden @ weight.t(), logits, atol=1e-5)
    assert tiny_model.lm_head.__class__ is torch.nn.Linear  # put back
