"""BitDelta and SVD low-rank delta compression."""

from __future__ import annotations

import functools

import pytest
import torch

from tunelab.merging import compress as C


def test_bitdelta_hand():
    d = torch.tensor([[0.5, -1.0], [0.0, -2.5]])
    c = C.bitdelta_compress(d)
    assert c.data.scale.item() == pytest.approx(1.0)  # mean |delta| = 4 / 4
    assert c.data.bits.tolist() == [0b10100000]  # signs (>= 0) 1,0,1,0 then zero padding
    assert torch.equal(c.decompress(), torch.tensor([[1.0, -1.0], [1.0, -1.0]]))  # sign(0) -> +1
    assert c.ratio == pytest.approx((1 + 4) / 16)  # 1 byte of bits + float32 scale vs 4 float32


def test_bitdelta_exact_scale_times_sign_and_ratio_bf16():
    g = torch.Generator().manual_seed(0)
    d = (0.01 * torch.randn(64, 128, generator=g)).to(torch.bfloat16)
    c = C.bitdelta_compress(d)
    scale = d.float().abs().mean()
    expected = (scale * torch.where(d >= 0, 1.0, -1.0)).to(torch.bfloat16)
    out = c.decompress()
    assert out.dtype == torch.bfloat16 and out.shape == d.shape
    assert torch.equal(out, expected)
    assert torch.equal(C.bitdelta_decompress(c.data), expected)
    # 8192 weights: 1024 bytes of bits + 4 bytes of scale vs 16384 bytes of bf16 -> ~1/16
    assert c.data.bits.numel() == 1024 and c.data.bits.dtype == torch.uint8
    assert c.ratio == pytest.approx(1028 / 16384)
    assert abs(c.ratio - 1 / 16) < 1e-3
    # against float32 storage the same payload is ~1/32
    assert C.bitdelta_compress(d, reference_dtype=torch.float32).ratio == pytest.approx(1028 / 32768)


def test_sign_packing_roundtrip_odd_length():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    packed = C.pack_signs(x)
    assert packed.numel() == 2
    assert torch.equal(C.unpack_signs(packed, 15).reshape(3, 5), torch.where(x >= 0, 1.0, -1.0))


def test_svd_exact_for_low_rank_delta():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)
    d = u @ v  # rank 2
    c = C.svd_compress(d, rank=2)
    torch.testing.assert_close(c.decompress(), d, rtol=0, atol=1e-5)
    assert c.data.up.shape == (6, 2) and c.data.down.shape == (2, 4)
    assert c.ratio == pytest.approx(2 * (6 + 4) / 24)


def test_svd_truncation_hand():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    torch.testing.assert_close(C.svd_compress(d, rank=1).decompress(), torch.diag(torch.tensor([3.0, 0.0, 0.0])))
    assert C.svd_compress(d, rank=10).data.rank == 3  # capped at min(m, n)
    with pytest.raises(ValueError, match="2-D"):
        C.svd_compress(torch.ones(4), rank=1)


def test_compress_deltas_dict():
    deltas = {"w": torch.ones(8, 8, dtype=torch.bfloat16), "b": torch.ones(8, dtype=torch.bfloat16)}
    c = C.compress_deltas(deltas, C.bitdelta_compress)
    assert isinstance(c.data["w"], C.Compressed) and torch.equal(c.data["b"], deltas["b"])
    assert c.ratio == pytest.approx((8 + 4 + 16) / (128 + 16))
    out = c.decompress()
    assert torch.equal(out["w"], deltas["w"]) and torch.equal(out["b"], deltas["b"])
    c2 = C.compress_deltas(deltas, functools.partial(C.svd_compress, rank=1))
    torch.testing.assert_close(c2.decompress()["w"], deltas["w"])


def _reference_bitdelta_training(student, teacher, signs, scales, batches, steps, lr):
    """BitDelta's train.py re-stated for comparison: each compressed Linear becomes x @ (W_base + coeff * sign)^T
    with a trainable scalar coeff (BinaryDiff), everything else frozen; AdamW(lr) over the coeffs (torch's
    defaults), CosineAnnealingLR(steps), loss = F.mse_loss(teacher logits, student logits)."""
    import torch.nn.functional as F

    class BinaryDiff(torch.nn.Module):
        def __init__(self, base, sign, coeff):
            super().__init__()
            self.register_buffer("base", base.clone())
            self.register_buffer("sign", sign.clone())
            self.coeff = torch.nn.Parameter(torch.tensor(coeff))

        def forward(self, x):
            return x @ (self.base + self.coeff * self.sign).T

    student.requires_grad_(False)
    coeffs = {}
    for name in signs:
        mod_name = name.removesuffix(".weight")
        parent, leaf = mod_name.rsplit(".", 1)
        lin = student.get_submodule(mod_name)
        bd = BinaryDiff(lin.weight.detach(), signs[name], scales[name])
        setattr(student.get_submodule(parent), leaf, bd)
        coeffs[name] = bd.coeff
    opt = torch.optim.AdamW(list(coeffs.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        b = batches[step % len(batches)]
        with torch.inference_mode():
            target = teacher(**b).logits
        loss = F.mse_loss(target.clone(), student(**b).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {n: float(c) for n, c in coeffs.items()}


def test_bitdelta_scale_distillation_equals_the_reference_training():
    """The second stage of BitDelta: the scales trained on logits MSE against the fine-tuned model, signs frozen.
    Equal to the reference train.py's loop, and the distilled model is closer to the fine-tuned one than the
    first stage's mean|delta| scales (all the old code produced)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    signs, scales = {}, {}
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if p.ndim == 2 and "embed" not in n and "lm_head" not in n:  # low-rank + noise, so scales matter
                d = 0.05 * (torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
                d += 0.01 * torch.randn(p.shape, generator=g)
                p.add_(d)
                assert C.bitdelta_compressible(n, d)
                signs[n] = torch.where(d >= 0, 1.0, -1.0)
                scales[n] = float(d.abs().mean())
    ids = torch.randint(0, 96, (6, 16), generator=g)
    batches = [{"input_ids": ids[i: i + 2], "attention_mask": torch.ones(2, 16, dtype=torch.long)} for i in (0, 2, 4)]
    student = copy.deepcopy(base)
    ours, losses = C.distill_bitdelta_scales(student, tuned, signs, scales, batches, steps=30, lr=1e-2)
    ref = _reference_bitdelta_training(copy.deepcopy(base), tuned, signs, scales, batches, steps=30, lr=1e-2)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert any(abs(ours[n] - scales[n]) > 1e-3 for n in scales)  # the scales moved

    def mse(model):
        with torch.no_grad():
            return sum(float((model(**b).logits - tuned(**b).logits).pow(2).mean()) for b in batches)

    first_stage = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in first_stage.named_parameters():
            if n in signs:
                p.add_(scales[n] * signs[n])
    assert mse(student) < 0.9 * mse(first_stage)
    assert sum(losses[-3:]) < sum(losses[:3])  # the same three batches, first and last pass
    for n, p in student.named_parameters():  # the student holds base + distilled scale * sign
        if n in signs:
            torch.testing.assert_close(p.detach(), dict(base.named_parameters())[n].detach() + ours[n] * signs[n])


def test_bitdelta_relative_lr_moves_each_scale_by_its_own_fraction():
    """relative_lr: matrix i's rate is relative_lr * alpha_i(0), so Adam's first step (about one rate, whatever
    the gradient's size) moves every scale by ~relative_lr of itself: small and large deltas alike."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    signs, scales = {}, {}
    with torch.no_grad():
        for k, (n, p) in enumerate((n, p) for n, p in tuned.named_parameters() if C.bitdelta_compressible(n, p)):
            d = (1e-5 if k % 2 else 1e-2) * torch.randn(p.shape, generator=g)  # scales 3 orders apart
            p.add_(d)
            signs[n], scales[n] = torch.where(d >= 0, 1.0, -1.0), float(d.abs().mean())
    ids = torch.randint(0, 96, (2, 12), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    got, _ = C.distill_bitdelta_scales(copy.deepcopy(base), tuned, signs, scales, batches, steps=1, relative_lr=0.05)
    for n in signs:
        assert abs(got[n] - scales[n]) / scales[n] == pytest.approx(0.05, rel=0.05), n
