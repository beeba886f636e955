"""GRPO-family losses and advantages against TRL 1.16's own trainer code (trl_rl_fakes.py) on the same
log-probs, rewards and masks: values and gradients to 1e-6, per loss type and option."""

from __future__ import annotations

import itertools

import pytest
import torch
from trl.trainer.rloo_trainer import RLOOTrainer
from trl_rl_fakes import trl_grpo_generation, trl_grpo_loss

from tunelab.objectives.advantages import group_relative, leave_one_out
from tunelab.objectives.policy_losses import aggregate, clipped_policy_loss, token_mean_sum
from tunelab.rewards.scoring import weighted_rewards

TOL = 1e-6
B, C, G = 8, 6, 4


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 1, 5, 2, 6, 4, 3])
    mask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).long()
    old = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    # policy moved away from the sampling policy, some ratios beyond the clip range either way
    logps = old + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, ref, adv, mask


def _ours(logps, inputs, *, loss_type, epsilon, epsilon_high, beta, level, max_len=C, delta=None):
    mask = inputs["completion_mask"].to(logps.dtype)
    old = inputs.get("old_per_token_logps")
    res = clipped_policy_loss(logps, logps.detach() if old is None else old, inputs["advantages"], mask,
                              epsilon_low=epsilon, epsilon_high=epsilon_high, beta=beta,
                              ref_logps=inputs.get("ref_per_token_logps"), importance_sampling_level=level,
                              delta=delta)
    s, t = float(mask.size(0)), float(mask.sum())
    loss = aggregate(res.per_token, mask, loss_type, step_sequences=s, step_tokens=t, max_completion_length=max_len) / s
    return loss, res, s, t


GRID = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], [0.0, 0.04], ["token", "sequence"],
                              [(0.2, None), (0.2, 0.28)], [True, False]))


@pytest.mark.parametrize("loss_type,beta,level,eps,with_old", GRID)
def test_grpo_loss_and_gradient_equal_trl(loss_type, beta, level, eps, with_old):
    logps0, old, ref, adv, mask = _case(hash((loss_type, beta, level, eps, with_old)) % 1000)
    epsilon, epsilon_high = eps
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum()}
    if with_old:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    a = logps0.clone().requires_grad_(True)
    theirs, metrics = trl_grpo_loss(a, inputs, loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high,
                                    beta=beta, importance_sampling_level=level)
    theirs.backward()
    b = logps0.clone().requires_grad_(True)
    ours, res, s, t = _ours(b, inputs, loss_type=loss_type, epsilon=epsilon,
                            epsilon_high=epsilon_high if epsilon_high is not None else epsilon, beta=beta, level=level)
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL
    assert torch.allclose(a.grad, b.grad, atol=TOL, rtol=0)
    assert a.grad.abs().sum() > 0  # the case exercises the gradient
    # logged metrics: TRL's names and definitions (token means; sequence means for GSPO's one ratio per sequence)
    m = mask.double()
    for key, ours_sum in (("clip_ratio/low_mean", token_mean_sum(res.low_clipped, m, step_sequences=s, step_tokens=t)),
                          ("clip_ratio/high_mean",
                           token_mean_sum(res.high_clipped, m, step_sequences=s, step_tokens=t))):
        assert abs(float(ours_sum) / s - metrics[key][0]) < TOL, key
    if beta:
        assert abs(float(token_mean_sum(res.kl, m, step_sequences=s, step_tokens=t)) / s - metrics["kl"][0]) < TOL


def test_clipping_is_exercised():
    """The parity cases contain ratios clipped on both sides (so clipping differences would show)."""
    logps, old, _, adv, mask = _case(3)
    res = clipped_policy_loss(logps, old, adv, mask.double(), epsilon_low=0.2, epsilon_high=0.2)
    assert bool((res.low_clipped & mask.bool()).any()) and bool((res.high_clipped & mask.bool()).any())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_two_micro_batches_equal_trl_gradient_accumulation(loss_type):
    """One step over two micro-batches (our loop: each loss sum / step completions) = TRL's accumulated loss."""
    logps0, old, ref, adv, mask = _case(11)
    halves = [slice(0, B // 2), slice(B // 2, B)]
    total_tokens = mask.sum()
    a = logps0.clone().requires_grad_(True)
    theirs = 0.0
    for h in halves:
        inp = {"prompt_ids": torch.zeros(B // 2, 2, dtype=torch.long),
               "prompt_mask": torch.ones(B // 2, 2, dtype=torch.long), "completion_ids": torch.zeros(B // 2, C),
               "completion_mask": mask[h], "advantages": adv[h], "old_per_token_logps": old[h],
               "num_items_in_batch": total_tokens}
        loss, _ = trl_grpo_loss(a[h], inp, loss_type=loss_type, grad_accum=2)
        theirs = theirs + loss
    theirs.backward()
    b = logps0.clone().requires_grad_(True)
    ours = 0.0
    s, t = float(B), float(total_tokens)
    for h in halves:
        res = clipped_policy_loss(b[h], old[h], adv[h], mask[h].double(), epsilon_low=0.2, epsilon_high=0.2)
        ours = ours + aggregate(res.per_token, mask[h].double(), loss_type, step_sequences=s, step_tokens=t,
                                max_completion_length=C) / s
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL
    assert torch.allclose(a.grad, b.grad, atol=TOL, rtol=0)


REWARDS = torch.tensor([[1.0, 0.5], [0.0, 0.5], [1.0, 0.0], [0.0, 1.0],  # group 0
                        [1.0, 0.2], [1.0, 0.2], [1.0, 0.2], [1.0, 0.2],  # group 1: all equal -> zero std
                        [0.0, float("nan")], [float("nan"), float("nan")], [1.0, 0.3], [0.5, 0.9]])  # NaNs
COMPLETIONS = [[3, 4, 2], [3, 2], [4, 4, 4, 4], [9, 2], [2], [5, 5, 2], [5, 5, 5, 5], [7, 2],
               [8, 8, 8, 8], [2], [6, 2], [6, 6, 2]]


@pytest.mark.parametrize("scale_rewards,weights,mask_truncated", list(itertools.product(
    ["group", "batch", "none"], [None, [1.0, 0.5]], [False, True])))
def test_group_advantages_and_masks_equal_trl(scale_rewards, weights, mask_truncated):
    out, metrics = trl_grpo_generation([[5, 6]] * len(COMPLETIONS), COMPLETIONS, REWARDS.clone(), num_generations=G,
                                       reward_weights=weights, scale_rewards=scale_rewards,
                                       mask_truncated_completions=mask_truncated)
    w = torch.tensor(weights or [1.0, 1.0])
    total = weighted_rewards(REWARDS, w)
    adv = group_relative(total, G, scale_rewards)
    assert torch.allclose(adv.values, out["advantages"], atol=TOL, rtol=0)
    assert abs(float(adv.zero_std.float().mean()) - metrics["frac_reward_zero_std"][0]) < TOL
    assert abs(float(torch.nanmean(total)) - metrics["reward"][0]) < TOL
    # truncation: a completion that does not end in EOS (id 2) or padding; masked out entirely when asked
    truncated = torch.tensor([c[-1] != 2 for c in COMPLETIONS])
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    ours_mask = (torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)).long()
    if mask_truncated:
        ours_mask = ours_mask * (~truncated).unsqueeze(1).long()
    assert torch.equal(ours_mask, out["completion_mask"])
    assert int(ours_mask.sum()) == int(out["num_items_in_batch"])


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(normalize):
    beta = 0.05
    n = len(COMPLETIONS)
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(n, 4, generator=g)
    ref = old + 0.1 * torch.randn(n, 4, generator=g)
    out, _ = trl_grpo_generation([[5, 6]] * n, COMPLETIONS, REWARDS.clone(), num_generations=G, beta=beta,
                                 old_logps=old, ref_logps=ref, trainer=RLOOTrainer, normalize_advantages=normalize)
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    mask = (torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)).float()
    total = weighted_rewards(REWARDS, torch.ones(2)) - beta * ((old - ref) * mask).sum(-1)
    adv = leave_one_out(total, G, normalize)
    assert torch.allclose(adv.values, out["advantages"], atol=TOL, rtol=0)
