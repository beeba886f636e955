"""sequence_logps vs a direct gather, token_kl vs F.kl_div, DFT stop-gradient, NEFTune, Masked Thought."""

import math

import torch
import torch.nn.functional as F

from tunelab.objectives.distill import token_kl
from tunelab.objectives.preference_losses import average_logps, sequence_logps, token_logps
from tunelab.objectives.sft_variants import dft_token_weights, masked_thought, neftune_noise


def test_sequence_logps_vs_direct_gather():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 13
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, 4:] = -100  # right padding
    s, n = sequence_logps(logits, labels)
    expected_s, expected_n = [], []
    for b in range(B):
        tot, cnt = 0.0, 0
        for t in range(1, T):
            if labels[b, t] != -100:
                tot += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                cnt += 1
        expected_s.append(tot)
        expected_n.append(cnt)
    torch.testing.assert_close(s, torch.tensor(expected_s, dtype=torch.float32), atol=1e-5, rtol=0)
    assert n.tolist() == expected_n == [4, 2, 3]
    torch.testing.assert_close(average_logps(s, n), s / torch.tensor([4.0, 2.0, 3.0]))
    # the per-token version agrees with F.cross_entropy on the shifted targets
    lp, mask = token_logps(logits, labels)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100)
    torch.testing.assert_close(lp, -ce.view(B, T - 1), atol=1e-5, rtol=0)
    assert mask.sum().item() == 9
    # bf16 logits are computed in fp32
    s16, _ = sequence_logps(logits.bfloat16(), labels)
    assert s16.dtype == torch.float32


def test_token_kl_vs_kl_div():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 17, generator=g, dtype=torch.float64)
    te = torch.randn(2, 6, 17, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 6, generator=g) > 0.4
    for temp in (1.0, 2.5):
        ls = F.log_softmax(s / temp, -1)[mask]
        lt = F.log_softmax(te / temp, -1)[mask]
        # F.kl_div(input, target) = sum target * (log target - input) = KL(target || input)
        fwd = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1) * temp**2
        rev = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1) * temp**2
        out_f = token_kl(s, te, mask, temp, "forward")
        out_r = token_kl(s, te, mask, temp, "reverse")
        assert out_f.shape == (int(mask.sum()),)
        torch.testing.assert_close(out_f, fwd, atol=1e-12, rtol=0)
        torch.testing.assert_close(out_r, rev, atol=1e-12, rtol=0)
        assert (out_f >= 0).all() and not torch.allclose(out_f, out_r)
    # identical distributions: zero; gradient flows to the student only through its logits
    s2 = s.clone().requires_grad_(True)
    z = token_kl(s2, s.detach(), mask, 1.0, "forward")
    torch.testing.assert_close(z, torch.zeros_like(z), atol=1e-12, rtol=0)
    token_kl(s2, te, mask, 2.0, "forward").sum().backward()
    assert s2.grad is not None and s2.grad[~mask].abs().max().item() == 0.0


def test_dft_weights_stop_gradient():
    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 5, 9
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100
    labels[1, 3:] = -100
    w = dft_token_weights(logits, labels)
    assert not w.requires_grad
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100)
    ce = ce.view(B, T - 1)
    mask = labels[:, 1:] != -100
    # the weights are the target probabilities exp(-CE), zero off target
    torch.testing.assert_close(w[mask], torch.exp(-ce.detach())[mask], atol=1e-12, rtol=0)
    assert (w[~mask] == 0).all()
    # grad of sum(w * CE) == sum over tokens of p_t * grad(CE_t): the weight itself is not differentiated
    (grad_dft,) = torch.autograd.grad((w * ce).sum(), logits, retain_graph=True)
    expected = torch.zeros_like(logits)
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t]:
                (gt,) = torch.autograd.grad(ce[b, t], logits, retain_graph=True)
                expected += w[b, t] * gt
    torch.testing.assert_close(grad_dft, expected, atol=1e-12, rtol=0)
    # ... and differs from the gradient of -sum(p) (what it would be without the stop-gradient)
    (grad_nosg,) = torch.autograd.grad((torch.exp(-ce) * ce).sum(), logits)
    assert (grad_nosg - grad_dft).abs().max() > 1e-3


def test_neftune_noise():
    g = torch.Generator().manual_seed(3)
    B, T, d, alpha = 3, 64, 32, 5.0
    embeds = torch.randn(B, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 16:] = 0  # 16 real tokens
    mask[2, 2:] = 0  # 2 real tokens
    out = neftune_noise(embeds, alpha, mask, training=True, generator=g)
    noise = out - embeds
    lengths = torch.tensor([64.0, 16.0, 2.0])
    bound = alpha / torch.sqrt(lengths * d)  # alpha / sqrt(L d)
    for b in range(B):
        real = mask[b].bool()
        nb = noise[b, real]
        assert nb.abs().max() <= bound[b] * (1 + 1e-5)
        assert nb.abs().max() >= 0.9 * bound[b]  # uniform over the full [-1, 1] range, not smaller
        assert (noise[b, ~real] == 0).all()  # padding untouched
    big = noise[0]  # 2048 draws of U(-b, b): mean ~ 0 (std of the mean = b / sqrt(3 * 2048))
    assert abs(big.mean().item()) < 0.05 * bound[0].item()
    assert abs(big.std().item() - bound[0].item() / math.sqrt(3)) < 0.05 * bound[0].item()
    # not training (or alpha = 0): the embeddings come back unchanged, the same object
    assert neftune_noise(embeds, alpha, mask, training=False) is embeds
    assert neftune_noise(embeds, 0.0, mask, training=True) is embeds
    # no mask: every position counts, L = T
    n2 = neftune_noise(embeds, alpha, None, generator=g) - embeds
    assert n2.abs().max() <= alpha / math.sqrt(T * d) * (1 + 1e-5)
    # reproducible with a seeded generator
    a = neftune_noise(embeds, alpha, mask, generator=torch.Generator().manual_seed(9))
    b = neftune_noise(embeds, alpha, mask, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_masked_thought():
    g = torch.Generator().manual_seed(4)
    B, T, MASK = 16, 128, 999
    input_ids = torch.randint(0, 500, (B, T), generator=g)
    labels = input_ids.clone()
    prompt_len = torch.randint(5, 40, (B,), generator=g)
    pad_from = torch.randint(90, 129, (B,), generator=g)
    for b in range(B):
        labels[b, : prompt_len[b]] = -100
        labels[b, pad_from[b] :] = -100
    labels_before = labels.clone()
    ids_before = input_ids.clone()
    p = 0.3
    out = masked_thought(input_ids, labels, p, MASK, generator=g)
    response = labels != -100
    assert torch.equal(labels, labels_before) and torch.equal(input_ids, ids_before)  # nothing changed in place
    assert torch.equal(out[~response], input_ids[~response])  # prompt and padding never touched
    changed = out != input_ids
    assert (out[changed] == MASK).all()
    frac = changed[response].float().mean().item()
    assert abs(frac - p) < 0.03, frac  # ~1100 response tokens: std of the fraction ~0.014
    # extremes
    assert torch.equal(masked_thought(input_ids, labels, 0.0, MASK, generator=g), input_ids)
    all_masked = masked_thought(input_ids, labels, 1.0, MASK, generator=g)
    assert (all_masked[response] == MASK).all() and torch.equal(all_masked[~response], input_ids[~response])
    # reproducible
    a = masked_thought(input_ids, labels, p, MASK, generator=torch.Generator().manual_seed(1))
    b = masked_thought(input_ids, labels, p, MASK, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
