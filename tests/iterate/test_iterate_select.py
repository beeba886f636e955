"""Selection rules, preference pairs, judge agreement and SPIN's loss on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.iterate.select import (
    PromptSamples,
    best_vs_worst,
    human_vs_generated,
    judge_agreement,
    pair_record,
    select_samples,
    sft_record,
)

NAN = math.nan


def _g(rewards, correct=None, completions=None, answer="ref", judge=None):
    completions = completions or [f"c{j}" for j in range(len(rewards))]
    per = {"judge": judge} if judge is not None else {}
    return PromptSamples([{"role": "user", "content": "q"}], answer, completions, rewards, correct or [], per)


def test_best_of_k_keeps_each_prompts_best_first_of_equals_and_min_reward():
    groups = [_g([0.1, 0.9, 0.5]), _g([0.5, 0.5, 0.2]), _g([0.0, 0.2, 0.1]), _g([NAN, NAN])]
    assert select_samples(groups, "best_of_k") == [(0, 1), (1, 0), (2, 1)]  # prompt 3: nothing scored
    assert select_samples(groups, "best_of_k", min_reward=0.5) == [(0, 1), (1, 0)]


def test_threshold_keeps_every_sample_at_or_above_it():
    groups = [_g([0.1, 0.9, 0.5]), _g([0.5, NAN, 0.2])]
    assert select_samples(groups, "threshold", threshold=0.5) == [(0, 1), (0, 2), (1, 0)]


def test_top_fraction_ranks_over_the_whole_round():
    groups = [_g([0.1, 0.9, 0.5]), _g([0.8, 0.3, 0.2])]
    # 6 scored samples, top 1/3 -> ceil(2) = the two best: 0.9 (prompt 0) and 0.8 (prompt 1)
    assert select_samples(groups, "top_fraction", top_fraction=1 / 3) == [(0, 1), (1, 0)]
    assert select_samples(groups, "top_fraction", top_fraction=0.5) == [(0, 1), (0, 2), (1, 0)]


def test_correct_only_keeps_verified_samples_deduplicated_and_capped():
    groups = [_g([1, 0, 1, 1], correct=[1.0, 0.0, 1.0, 1.0], completions=["a", "b", "a ", "c"]),
              _g([0, 0], correct=[0.0, None])]
    assert select_samples(groups, "correct_only") == [(0, 0), (0, 3)]  # "a " is "a" again
    assert select_samples(groups, "correct_only", max_per_prompt=1) == [(0, 0)]


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_samples([_g([1.0])], "best_of_n")


def test_best_vs_worst_pairs_the_extremes_and_skips_groups_without_spread():
    groups = [_g([0.2, 1.0, 0.0, 1.0]), _g([0.5, 0.5]), _g([1.0, 0.0], completions=["same", "same"]),
              _g([NAN, 0.3, 0.1])]
    assert best_vs_worst(groups) == [(0, 1, 2), (3, 1, 2)]
    rec = pair_record(groups[0], "c1", "c2")
    assert rec == {"prompt": [{"role": "user", "content": "q"}], "chosen": "c1", "rejected": "c2"}


def test_human_vs_generated_rejects_each_generation_unlike_the_human_answer():
    groups = [_g([NAN, NAN], completions=["mine", "ref"], answer="ref"), _g([NAN], completions=["x"], answer=None)]
    assert human_vs_generated(groups) == [(0, 0)]


def test_sft_record_appends_the_completion_as_the_assistant_turn():
    assert sft_record(_g([1.0], completions=["2024-01-02"]), 0)["messages"][-1] == \
        {"role": "assistant", "content": "2024-01-02"}


def test_judge_agreement_counts_pairs_the_verifier_separates():
    # prompt 0: right = {0}, wrong = {1, 2}: judge 0.8 > 0.2 (agree), 0.8 == 0.8 (tie: 1/2)
    # prompt 1: right = {1}, wrong = {0}: judge 0.6 > 0.4 for the wrong one (disagree)
    groups = [_g([0, 0, 0], correct=[1.0, 0.0, 0.0], judge=[0.8, 0.2, 0.8]),
              _g([0, 0], correct=[0.0, 1.0], judge=[0.6, 0.4]), _g([0, 0], correct=[1.0, 1.0], judge=[0.1, 0.9])]
    assert judge_agreement(groups, "judge") == {"judge_agreement": pytest.approx(1.5 / 3), "judge_pairs": 3}
    assert judge_agreement([_g([0.0], correct=[1.0], judge=[0.5])], "judge") == \
        {"judge_agreement": None, "judge_pairs": 0}


def test_spin_loss_on_hand_computed_logprobs():
    from tunelab.objectives.spin import spin_loss

    pol_h, pol_g = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_h, ref_g = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -5.0])
    # pair 0: t = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2; pair 1: t = 0.1 * (0 - 2) = -0.2
    res = spin_loss(pol_h, pol_g, ref_h, ref_g, 0.1)
    assert res.losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2))])
    assert res.chosen_rewards.tolist() == pytest.approx([0.1, 0.0]) and res.rejected_rewards.tolist() == \
        pytest.approx([-0.1, 0.2])
    hinge = spin_loss(pol_h, pol_g, ref_h, ref_g, 0.1, "hinge")
    assert hinge.losses.tolist() == pytest.approx([0.8, 1.2])


def test_spin_objective_is_dpo_sigmoid_with_human_chosen(tiny_model, tiny_tokenizer):
    """Same pairs, same reference: SPIN's loss equals DPO's sigmoid loss (SPIN is DPO with chosen = human, rejected
    = the previous model's generation), and its gradient is not zero."""
    from tunelab.data.batching import collate_preference
    from tunelab.data.encode import encode_preference
    from tunelab.data.formats import PreferenceExample
    from tunelab.objectives.base import build_objective

    ex = PreferenceExample([{"role": "user", "content": "What is 2 + 2?"}], [{"role": "assistant", "content": "4"}],
                           [{"role": "assistant", "content": "five"}], "t")
    enc = [encode_preference(tiny_tokenizer, ex, max_length=64, truncation="drop")] * 2
    batch = collate_preference(enc, pad_id=tiny_tokenizer.pad_token_id)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.tensor([-9.0, -9.0]), torch.tensor([-7.0, -7.0])
    spin = build_objective("spin", {"beta": 0.1}).compute(tiny_model, batch)
    dpo = build_objective("dpo", {"beta": 0.1}).compute(tiny_model, batch)
    assert spin.loss_sum.item() == pytest.approx(dpo.loss_sum.item(), rel=1e-6)
    spin.loss_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_judge_reads_the_score_line_else_the_first_number():
    from tunelab.rewards.judge import RUBRICS, parse_score

    assert parse_score("The response is relevant (1 point) ... Score: 3") == 3.0
    assert parse_score("4 points") == 4.0
    with pytest.raises(ValueError, match="no score"):
        parse_score("excellent")
    assert "additive 5-point scoring system" in RUBRICS["self_rewarding"]
    assert "{prompt}" in RUBRICS["self_rewarding"] and "{completion}" in RUBRICS["self_rewarding"]
