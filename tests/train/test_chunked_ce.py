"""Tests for tunelab.train.chunked_ce: exact chunked cross-entropy and the causal-LM wrappers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.train import chunked_ce
from tunelab.train.chunked_ce import causal_lm_loss, chunked_cross_entropy, naive_causal_lm_loss

IGNORE = -100


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(n=37, d=16, v=50, *, weight_grad=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(True)  # [N, d]
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_(weight_grad)  # [V, d]
    labels = torch.randint(0, v, (n,), generator=g)  # [N]
    labels[:9] = IGNORE  # a fully ignored leading run: whole chunks for chunk_size 4 / 7
    labels[20] = IGNORE  # and an isolated ignored token inside a chunk
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, scale=0.37):
    hidden.grad = None
    weight.grad = None
    loss = fn()
    (loss * scale).backward()  # non-unit grad_output
    gw = weight.grad.clone() if weight.requires_grad else None
    return loss.detach(), hidden.grad.clone(), gw


# ---------------------------------------------------------------------------
# chunked_cross_entropy vs F.cross_entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("weight_grad", [True, False])
# N = 37 tokens, 10 ignored -> 27 valid: 9 divides it, 4 and 13 do not, 1024 = one chunk.  Positions
# 0..8 are all ignored, i.e. whole all-ignored chunks in position space (they are dropped before chunking).
@pytest.mark.parametrize("chunk_size", [4, 9, 13, 1024])
def test_matches_reference_fp32(chunk_size, weight_grad, grad_in_forward):
    hidden, weight, labels = _inputs(weight_grad=weight_grad)
    ref = _loss_and_grads(
        lambda: F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="sum"), hidden, weight
    )
    got = _loss_and_grads(
        lambda: chunked_cross_entropy(
            hidden, weight, labels, chunk_size=chunk_size, ignore_index=IGNORE, grad_in_forward=grad_in_forward
        ),
        hidden,
        weight,
    )
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.all(got[1][:9] == 0) and torch.all(got[1][20] == 0)  # ignored tokens: exactly zero grad
    if weight_grad:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    else:
        assert weight.grad is None


def test_chunk_sizes_that_do_not_divide_n_without_ignored_tokens():
    hidden, weight, _ = _inputs(n=23)
    labels = torch.randint(0, weight.shape[0], (23,), generator=torch.Generator().manual_seed(1))
    ref = _loss_and_grads(lambda: F.cross_entropy(hidden @ weight.T, labels, reduction="sum"), hidden, weight)
    for cs in (1, 5, 23, 24):
        got = _loss_and_grads(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=cs), hidden, weight)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_all_tokens_ignored(grad_in_forward):
    hidden, weight, labels = _inputs()
    labels = torch.full_like(labels, -1)
    loss = chunked_cross_entropy(hidden, weight, labels, ignore_index=-1, grad_in_forward=grad_in_forward)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and hidden.grad.shape == hidden.shape
    assert torch.count_nonzero(weight.grad) == 0 and weight.grad.shape == weight.shape


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_gradcheck_float64(grad_in_forward):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([1, IGNORE, 8, 0, 3, IGNORE])
    fn = lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=3, grad_in_forward=grad_in_forward)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5)
    loss = fn(hidden, weight)
    assert loss.dtype == torch.float64
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_retained_graph_backward_twice_with_different_grad_outputs():
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)  # grads computed in forward
    for scale in (0.3, 2.0, 1.0):
        gh, gw = torch.autograd.grad(loss, (hidden, weight), torch.tensor(scale), retain_graph=True)
        torch.testing.assert_close(gh, rh * scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, rw * scale, rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_inputs_give_loss_only():
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    loss2 = chunked_cross_entropy(hidden.detach(), weight.detach(), labels, chunk_size=8)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-5, atol=1e-5)


def test_input_validation():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(TypeError):
        chunked_cross_entropy(hidden, weight, labels.float())


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("chunk_size", [16, 1024])
def test_bf16_autocast_close_to_naive_autocast(chunk_size, grad_in_forward):
    """Under CPU bf16 autocast both paths build bf16 logits and bf16 dlogits.

    Tolerances: the loss is the fp32 log-sum-exp of the *same* bf16 logits, so only fp32 summation
    order differs (rtol 1e-5).  Gradients go through bf16 matmuls in both paths but are rounded at
    different points (chunked: grad_output applied after the bf16 products when grad_in_forward,
    per-chunk bf16 weight-grad products summed in fp32), so they agree to bf16 precision only
    (eps = 2**-8 ~ 3.9e-3): we require a relative L2 error < 1e-2 vs the naive path, and that the
    chunked path is no less accurate than the naive one w.r.t. the exact fp64 gradient.
    """
    hidden, weight, labels = _inputs(n=200, d=32, v=400, seed=5)
    scale = 1.0 / 187  # a normalisation by a non-power-of-two token count
    exact = _loss_and_grads(
        lambda: F.cross_entropy(hidden.double() @ weight.double().T, labels, reduction="sum"), hidden, weight, scale
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = _loss_and_grads(
            lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum"), hidden, weight, scale
        )
        got = _loss_and_grads(
            lambda: chunked_cross_entropy(
                hidden, weight, labels, chunk_size=chunk_size, grad_in_forward=grad_in_forward
            ),
            hidden,
            weight,
            scale,
        )
    assert got[0].dtype == torch.float32
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype  # fp32 grads for fp32 params
    torch.testing.assert_close(got[0], naive[0], rtol=1e-5, atol=1e-4)
    for i in (1, 2):
        assert _rel_norm(got[i], naive[i]) < 1e-2
        assert _rel_norm(got[i], exact[i]) < 1.5 * _rel_norm(naive[i], exact[i]) + 1e-4


def test_never_materialises_full_logits():
    """Peak extra CPU tensor memory (torch profiler allocator events) is far below the naive path's."""
    from torch.profiler import ProfilerActivity, profile

    n, d, v = 512, 32, 4096  # full fp32 logits: 8 MiB
    hidden, weight, labels = _inputs(n=n, d=d, v=v, weight_grad=False)

    def peak(fn):
        hidden.grad = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn().backward()
        events = [
            (e.start_ns(), i, e.nbytes())
            for i, e in enumerate(prof.profiler.kineto_results.events())
            if e.name() == "[memory]"
        ]
        live = top = 0
        for _, _, nb in sorted(events):
            live += nb
            top = max(top, live)
        return top

    naive = peak(lambda: F.cross_entropy(hidden @ weight.T, labels, reduction="sum"))
    chunked = peak(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=32))
    assert naive >= 2 * n * v * 4  # logits + their grad, at least
    assert chunked < 0.25 * naive
    assert chunked < n * v * 4 / 2  # never even half a full logits tensor


# ---------------------------------------------------------------------------
# causal_lm_loss on a tiny Llama (plain / PEFT LoRA)
# ---------------------------------------------------------------------------


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _batch(vocab=300, b=3, t=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (b, t), generator=g)  # [B, T]
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, -5:] = 0  # right padding in row 1
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE
    labels[:, :4] = IGNORE  # a "prompt" that is not trained on
    return input_ids, attention_mask, labels


def _run(loss_fn, model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, n_tok = loss_fn(model, *batch, **kw)
    (loss / n_tok).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n_tok, grads


def _assert_same(got, ref, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert int(got[1]) == int(ref[1])
    assert got[2].keys() == ref[2].keys() and len(ref[2]) > 0
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=rtol, atol=atol, msg=name)


def test_causal_lm_loss_plain_model_equals_naive():
    model = _tiny_llama()
    batch = _batch()
    ref = _run(naive_causal_lm_loss, model, batch)
    got = _run(causal_lm_loss, model, batch, chunk_size=8)
    n_expected = int((batch[2][:, 1:] != IGNORE).sum())
    assert int(ref[1]) == n_expected
    assert len(ref[2]) == len(list(model.parameters()))  # all (tied) params trainable, incl. lm_head/embedding
    assert ref[2]["model.embed_tokens.weight"].abs().sum() > 0
    _assert_same(got, ref)
    # also equal to HF's own (mean) loss
    model.zero_grad(set_to_none=True)
    hf = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
    torch.testing.assert_close(got[0] / got[1], hf.detach(), rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_peft_lora_equals_naive():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch = _batch()
    ref = _run(naive_causal_lm_loss, model, batch)
    got = _run(causal_lm_loss, model, batch, chunk_size=16)
    assert all("lora_" in n for n in ref[2]) and len(ref[2]) == 2 * 2 * 2  # A,B x q,v x 2 layers
    assert all(g.abs().sum() > 0 for g in ref[2].values())
    _assert_same(got, ref)


def test_causal_lm_loss_lora_on_lm_head_falls_back(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    calls = []
    orig = chunked_ce.chunked_cross_entropy
    monkeypatch.setattr(chunked_ce, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or orig(*a, **k))
    batch = _batch()
    ref = _run(naive_causal_lm_loss, model, batch)
    got = _run(causal_lm_loss, model, batch)
    assert calls == []  # the LoRA lm_head is not a plain nn.Linear -> naive path
    _assert_same(got, ref, rtol=1e-6, atol=1e-7)

    # and the chunked path is taken when lm_head is a plain Linear
    calls.clear()
    plain = _tiny_llama()
    _run(causal_lm_loss, plain, batch)
    assert calls == [1]


def test_causal_lm_loss_bf16_autocast_close_to_naive():
    model = _tiny_llama()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(naive_causal_lm_loss, model, batch)
        got = _run(causal_lm_loss, model, batch, chunk_size=8)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-3)  # same bf16 backbone, same bf16 logits
    assert int(got[1]) == int(ref[1])
    for name in ref[2]:
        assert _rel_norm(got[2][name], ref[2][name]) < 2e-2, name  # bf16-level (see the tensor-level test)


def test_causal_lm_loss_takes_the_chunked_path_through_a_process_wrapper(monkeypatch):
    """Under DDP (and DeepSpeed's engine) the model is a wrapper with `.module`: the chunked path must still find
    the lm_head (it fell back to full logits before, so 2 processes computed other bf16 gradients than 1)."""
    from peft import LoraConfig, get_peft_model

    class Wrapper(torch.nn.Module):  # DDP's shape: the model under `.module`, forward delegated
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    calls = []
    orig = chunked_ce.chunked_cross_entropy
    monkeypatch.setattr(chunked_ce, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    batch = _batch()
    ref = _run(naive_causal_lm_loss, model, batch)
    got = _run(lambda m, *b, **k: causal_lm_loss(Wrapper(m), *b, **k), model, batch, chunk_size=16)
    assert calls == [1]
    _assert_same(got, ref)
