"""Every loss of tunelab.objectives.{preference,distill,sft_variants} on fixed small tensors,
against numbers worked out by hand (the derivation is in the comments)."""

import math

import pytest
import torch

from tunelab.objectives.distill import token_kl
from tunelab.objectives.preference_losses import (
    dpo_sigmoid,
    hinge,
    ipo,
    kto,
    kto_kl_estimate,
    orpo,
    robust_dpo,
    sequence_logps,
    simpo,
)
from tunelab.objectives.sft_variants import dft_token_weights

D = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=D)


# Two pairs, beta = 0.5.
#   pair 1: log-ratios chosen -10-(-11) = +1, rejected -12-(-11) = -1  -> h = 2,  beta*h = 1
#   pair 2: log-ratios chosen  -5-(-5)  =  0, rejected  -4-(-5)  = +1  -> h = -1, beta*h = -0.5
POL_C, POL_R, REF_C, REF_R, BETA = t(-10, -5), t(-12, -4), t(-11, -5), t(-11, -5), 0.5
# -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286 ; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740769841801067
A1, A2 = 0.31326168751822286, 0.9740769841801067


def close(x, values, tol=1e-12):
    torch.testing.assert_close(x, torch.tensor(values, dtype=x.dtype), atol=tol, rtol=0)


def test_dpo_sigmoid_hand():
    res = dpo_sigmoid(POL_C, POL_R, REF_C, REF_R, BETA)
    close(res.losses, [A1, A2])
    close(res.chosen_rewards, [0.5, 0.0])  # beta * (pol_c - ref_c)
    close(res.rejected_rewards, [-0.5, 0.5])


def test_cdpo_label_smoothing_hand():
    # (1-e)(-log s(z)) + e(-log s(-z)) = -log s(z) + e z, since -log s(-z) = -log s(z) + z; e = 0.1
    res = dpo_sigmoid(POL_C, POL_R, REF_C, REF_R, BETA, label_smoothing=0.1)
    close(res.losses, [A1 + 0.1 * 1.0, A2 + 0.1 * (-0.5)])
    close(res.losses, [0.41326168751822286, 0.9240769841801067])


def test_ipo_hand():
    # 1/(2 beta) = 1. pair 1: lengths (4, 2): 1/4 - (-1)/2 = 0.75 -> (0.75 - 1)^2 = 0.0625
    #                 pair 2: lengths (5, 1): 0/5 - 1/1 = -1    -> (-1 - 1)^2 = 4
    res = ipo(POL_C, POL_R, REF_C, REF_R, BETA, torch.tensor([4, 5]), torch.tensor([2, 1]))
    close(res.losses, [0.0625, 4.0])
    close(res.chosen_rewards, [0.5, 0.0])
    # a zero length is clamped to 1 (never a division by zero)
    res0 = ipo(POL_C, POL_R, REF_C, REF_R, BETA, torch.tensor([0, 5]), torch.tensor([2, 1]))
    close(res0.losses[:1], [(1.0 + 0.5 - 1.0) ** 2])


def test_hinge_hand():
    # max(0, 1 - beta h): pair 1: 1 - 1 = 0 ; pair 2: 1 + 0.5 = 1.5
    res = hinge(POL_C, POL_R, REF_C, REF_R, BETA)
    close(res.losses, [0.0, 1.5])


def test_robust_dpo_hand():
    # [(1-e) A - e (A + z)] / (1 - 2e) = A - e z / (1 - 2e), e = 0.1 -> A - 0.125 z
    res = robust_dpo(POL_C, POL_R, REF_C, REF_R, BETA, label_smoothing=0.1)
    close(res.losses, [A1 - 0.125, A2 + 0.0625])
    close(res.losses, [0.18826168751822286, 1.0365769841801067])
    # e = 0 is plain DPO
    close(robust_dpo(POL_C, POL_R, REF_C, REF_R, BETA).losses, [A1, A2])
    with pytest.raises(ValueError):
        robust_dpo(POL_C, POL_R, REF_C, REF_R, BETA, label_smoothing=0.5)


def test_simpo_hand():
    # beta = 2, gamma = 0.5. pair 1: 2 (-1 + 1.5) - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.4740769841801067
    #                        pair 2: 2 (-2 + 1)   - 0.5 = -2.5 -> log(1 + e^2.5) = 2.5788897342925496
    res = simpo(t(-1.0, -2.0), t(-1.5, -1.0), beta=2.0, gamma=0.5)
    close(res.losses, [0.4740769841801067, 2.5788897342925496])
    close(res.chosen_rewards, [-2.0, -4.0])
    close(res.rejected_rewards, [-3.0, -2.0])


def test_orpo_hand():
    # log odds(P) = log P - log(1 - P), log P = avg logp.
    # pair 1: c=-0.5, r=-1: (-0.5 + 1) - (log(1-e^-0.5) - log(1-e^-1))
    #         = 0.5 - (-0.9327521295671886 + 0.4586751453870819)
    #         = 0.9740769841801067 ; loss = -0.2 log sigmoid(0.97407...) = 0.06405995704750732
    # pair 2: c=-2, r=-0.25: log-odds ratio -3.113278091577173 ; loss = 0.6313546598061397
    res = orpo(t(-0.5, -2.0), t(-1.0, -0.25), lam=0.2)
    close(res.losses, [0.06405995704750732, 0.6313546598061397])
    close(res.chosen_rewards, [-0.1, -0.4])
    # P(chosen) = 1 (average log-prob exactly 0, reachable in fp32): finite loss and gradient
    c = torch.tensor([0.0, -0.5], requires_grad=True)
    out = orpo(c, torch.tensor([-1.0, -1.0]), lam=0.2).losses
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(c.grad).all()
    assert out[0].item() < 1e-5  # odds ratio is huge -> the term vanishes


def test_kto_hand():
    # pol - ref = r = [1, 0, -1], desirable = [T, F, T], z0 = 0.5, beta = 2, w_D = 1, w_U = 1.5
    # ex 1 (D): 1 - s(2 (1 - 0.5))   = 1 - s(1)  = 0.2689414213699951
    # ex 2 (U): 1.5 (1 - s(2 (0.5 - 0))) = 1.5 (1 - s(1)) = 0.40341213205499266
    # ex 3 (D): 1 - s(2 (-1 - 0.5))  = 1 - s(-3) = 0.9525741268224333
    res = kto(t(-3, -4, -6), t(-4, -4, -5), torch.tensor([True, False, True]), 0.5, 2.0, 1.0, 1.5)
    close(res.losses, [0.2689414213699951, 0.40341213205499266, 0.9525741268224333])
    close(res.chosen_rewards, [2.0, -2.0])
    close(res.rejected_rewards, [0.0])
    # z0: mean(pol - ref) over mismatched pairs, clamped at 0
    close(kto_kl_estimate(t(-3, -2), t(-4, -2)), 0.5)
    close(kto_kl_estimate(t(-5, -2), t(-4, -2)), 0.0)


def test_sequence_logps_hand():
    # uniform logits over V = 3: every target token has log-prob -log 3 = -1.0986122886681098
    logits = torch.zeros(2, 4, 3, dtype=D)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, 0]])
    s, n = sequence_logps(logits, labels)
    close(s, [-2 * 1.0986122886681098, -1.0986122886681098], tol=1e-6)
    assert n.tolist() == [2, 1]
    # logits[:, t] predict labels[:, t+1]: make position 0 of row 0 certain about token 1
    logits[0, 0] = torch.tensor([0.0, math.log(2.0), 0.0])  # p(1) = 2/4 = 0.5
    s, _ = sequence_logps(logits, labels)
    close(s[:1], [math.log(0.5) - 1.0986122886681098], tol=1e-6)


def test_token_kl_hand():
    # student uniform (0.5, 0.5); teacher logits (log 3, 0) -> (0.75, 0.25)
    # forward KL(p_t||p_s) = 0.75 log 1.5 + 0.25 log 0.5 = 0.13081203594113697
    # reverse KL(p_s||p_t) = 0.5 log(2/3) + 0.5 log 2     = 0.14384103622589042
    s = torch.zeros(1, 2, 2, dtype=D)
    te = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]], dtype=D)
    mask = torch.tensor([[True, False]])
    close(token_kl(s, te, mask, 1.0, "forward"), [0.13081203594113697], tol=1e-7)
    close(token_kl(s, te, mask, 1.0, "reverse"), [0.14384103622589042], tol=1e-7)
    # T = 2 with doubled teacher logits gives the same distributions, times T^2 = 4
    close(token_kl(s, 2 * te, mask, 2.0, "forward"), [0.5232481437645479], tol=1e-7)
    # no mask: every position; the second has identical distributions -> 0
    close(token_kl(s, te, None, 1.0, "forward"), [0.13081203594113697, 0.0], tol=1e-7)
    with pytest.raises(ValueError):
        token_kl(s, te, mask, 1.0, "sideways")


def test_dft_weights_hand():
    # position 0 predicts label[1] = 0 with logits (log 3, 0): p = 0.75 ; position 1 -> label[2] = -100 -> 0
    logits = torch.tensor([[[math.log(3.0), 0.0], [5.0, 1.0], [0.0, 0.0]]], dtype=D)
    labels = torch.tensor([[-100, 0, -100]])
    w = dft_token_weights(logits, labels)
    assert w.shape == (1, 2)
    close(w, [[0.75, 0.0]], tol=1e-6)
