"""Hand-computed cases: RLOO and REINFORCE++ advantages, on-line DPO pairs, the rewards, prompt loading."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.data.formats import DataError, Record
from tunelab.data.prompts import record_to_prompt
from tunelab.objectives.advantages import group_relative, leave_one_out, nanstd, reinforce_pp
from tunelab.objectives.online_dpo import pair_roles
from tunelab.recipe import Recipe
from tunelab.rewards.base import build_reward, list_rewards
from tunelab.rewards.math_answers import answers_match, extract_answer
from tunelab.rewards.scoring import RewardSet, weighted_rewards
from tunelab.train.rollout import Completion


def test_leave_one_out_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0])  # one group of 4
    adv = leave_one_out(r, 4).values
    # baseline of row i = mean of the other three
    assert adv.tolist() == pytest.approx([1 - 1.0, 0 - 4 / 3, 0 - 4 / 3, 3 - 1 / 3])


def test_group_relative_by_hand():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of 2
    a = group_relative(r, 2, "group")
    s = math.sqrt(0.5)  # sample std of (1, 0)
    assert a.values.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])
    assert a.zero_std.tolist() == [False, False, True, True]
    assert group_relative(r, 2, "none").values.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert float(nanstd(torch.tensor([1.0, float("nan"), 3.0]))) == pytest.approx(math.sqrt(2))


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.1]])
    a = reinforce_pp(rewards, mask, 1, token_kl=kl, kl_coef=0.5)
    # token rewards: row 0 = [-0.05, 1 - 0.1]; row 1 = [-0.15, 0, -0.05]
    # returns to go: [0.85, 0.9], [-0.2, -0.05, -0.05]
    flat = torch.tensor([0.85, 0.9, -0.2, -0.05, -0.05])
    want = (flat - flat.mean()) / (flat.std() + 1e-4)
    got = torch.cat([a.values[0, :2], a.values[1]])
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert float(a.values[0, 2]) == 0.0  # padding
    # no KL: every token of a completion carries its (normalised) reward
    b = reinforce_pp(rewards, mask, 1)
    assert b.values[0, 0] == b.values[0, 1] and b.values[1, 0] == b.values[1, 2]
    # REINFORCE++-baseline: group mean removed first (a group of 2 with rewards 1, 0 -> +0.5, -0.5)
    c = reinforce_pp(rewards, mask, 2, baseline="group")
    assert float(c.values[0, 0]) > 0 > float(c.values[1, 0])


def test_online_dpo_pairs_best_and_worst_of_each_group():
    r = torch.tensor([0.2, 0.9, 0.1, 0.5,   1.0, 1.0, 1.0, 1.0,   float("nan"), 0.3, 0.3, 0.7])
    roles = pair_roles(r, 4).view(3, 4)
    assert roles[0].tolist() == [0, 1, -1, 0]
    assert roles[1].tolist() == [0, 0, 0, 0]  # all equal: no pair
    assert roles[2].tolist() == [0, -1, 0, 1]  # NaN is never chosen nor rejected; ties: the first worst


def test_weighted_rewards_skip_nan_and_mark_unscorable():
    per = torch.tensor([[1.0, 0.5], [float("nan"), 2.0], [float("nan"), float("nan")]])
    out = weighted_rewards(per, torch.tensor([1.0, 0.5]))
    assert out[:2].tolist() == [1.25, 1.0] and math.isnan(out[2])


@pytest.mark.parametrize("text,want", [
    ("Janet sells 9 eggs.\n#### 18", "18"), ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("She pays $1,234.50 in total.", "1,234.50"), ("The answer is 42 apples.", "42"), ("no number", None)])
def test_math_answer_extraction(text, want):
    assert extract_answer(text) == want


def test_math_reward_compares_numbers_with_units_and_separators():
    r = build_reward("math", {})
    refs = ["Janet sells 16 - 3 - 4 = 9 eggs.\n#### 1234", "#### 0.5", "#### 7"]
    outs = ["She makes $1,234 a day.", "The answer is \\boxed{\\frac{1}{2}}", "It is 8."]
    assert r.score(["q"] * 3, outs, refs) == [1.0, 1.0, 0.0]
    assert answers_match("18", "18.0") and not answers_match(None, "3")


def test_task_reward_uses_the_builtin_checker_and_exact_match_for_files():
    r = build_reward("task", {})
    got = r.score(["q", "q", "q"], ["085", "2021-03-05", " a  b "], ["85", "2021-03-05", "a b"],
                  tasks=["arithmetic", "date_format", None])
    assert got == [1.0, 1.0, 1.0]
    assert r.score(["q"], ["2021-3-5"], ["2021-03-05"], tasks=["date_format"]) == [0.0]


def test_format_and_length_rewards():
    regex = build_reward("regex", {"pattern": r"\d{4}-\d{2}-\d{2}", "mode": "fullmatch"})
    assert regex.score(["q"] * 2, [" 2021-03-05\n", "It is 2021-03-05"], [None] * 2) == [1.0, 0.0]
    tags = build_reward("tags", {})
    assert tags.score(["q"] * 3, ["<think>a</think><answer>b</answer>", "<answer>b</answer>", "x"], [None] * 3) == \
        [1.0, 0.5, 0.0]
    over = build_reward("overlong", {"max_length": 10, "buffer": 4})
    assert over.score(["q"] * 4, [""] * 4, [None] * 4, lengths=[6, 8, 10, 11]) == [0.0, -0.5, -1.0, -1.0]
    length = build_reward("length", {"target": 5, "per_token": 0.1})
    assert length.score(["q"] * 2, [""] * 2, [None] * 2, lengths=[3, 8]) == pytest.approx([0.0, -0.3])


def test_every_reward_is_registered():
    assert {"task", "math", "regex", "tags", "length", "overlong", "function", "judge", "reward_model"} <= set(
        list_rewards())


def test_reward_set_isolates_failing_completions_and_counts_them(caplog):
    class Flaky:
        name, verifier, needs_answer = "flaky", True, False

        def score(self, prompts, completions, refs, **info):
            if any(c == "bad" for c in completions):
                raise ValueError("cannot parse")
            return [1.0 if c == "ok" else 0.0 for c in completions]

    rs = RewardSet([Flaky()], [1.0])
    comps = [Completion(0, [1], t, "stop") for t in ("ok", "bad", "no")]
    items = [record_to_prompt(Record({"prompt": "p", "answer": "a"}, "x:1"), None, None)] * 3
    out = rs(items, comps)
    assert out.per_func[:, 0].tolist() == [1.0, 0.0, 0.0] and out.errors == {"flaky": 1}
    assert out.correct.tolist() == [1.0, 0.0, 0.0]
    assert "reward 'flaky' failed on 1 of 3 completions" in caplog.text


def test_one_reward_builder_for_rl_and_iterate_reward_lists():
    """`RewardSet.from_specs` builds both lists (RL `rewards:`, `iterate.rewards:`): names as the specs give them
    (repeats numbered), weights, options, and the caller's context (the judge's `policy`) reach each reward."""
    from tunelab.iterate import sampling
    from tunelab.recipe.iterate import IterateConfig

    it = IterateConfig(strategy="raft", rewards=[{"name": "length", "target": 5, "weight": 0.5},
                                                 {"name": "length", "target": 9}, {"name": "judge", "scale": 5}])
    rs = RewardSet.from_specs(it.rewards, policy=lambda: "the policy", tokenizer="tok", precision="fp32")
    assert rs.names == ["length", "length_2", "judge"] and rs.weights.tolist() == [0.5, 1.0, 1.0]
    assert [r.config.target for r in rs.rewards[:2]] == [5, 9] and rs.rewards[2].config.scale == 5
    assert rs.rewards[2].context["policy"]() == "the policy" and rs.rewards[2].context["precision"] == "fp32"
    recipe = Recipe.model_validate({"rollout": {}, "rewards": [spec.model_dump() for spec in it.rewards]})
    assert RewardSet.from_specs(recipe.rewards).names == rs.names  # the RL list: the same builder, same result
    assert not hasattr(RewardSet, "from_recipe") and not hasattr(sampling, "build_rewards")  # no second copy


def test_prompt_records_gsm8k_messages_and_missing_prompts():
    gsm = record_to_prompt(Record({"question": "2+2?", "answer": "#### 4"}, "f:1"), None, "Be brief.")
    assert gsm.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"})
    assert gsm.answer == "#### 4" and gsm.text == "2+2?"
    chat = record_to_prompt(Record({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}, "f:2"), None, None)
    assert chat.messages == ({"role": "user", "content": "hi"},) and chat.answer == "hello"
    with pytest.raises(DataError, match="f:3: no prompt"):
        record_to_prompt(Record({"text": "x"}, "f:3"), None, None)


def test_judge_scales_the_rubric_score_and_refuses_replies_without_one(monkeypatch):
    import tunelab.generate as gen

    replies = iter([["7", "Score: 10", "12"], ["no idea"]])

    class Out:
        def __init__(self, texts):
            self.texts = texts

    seen = []

    def fake_generate(model, tok, prompts, cfg):
        seen.append(prompts)
        return Out(next(replies))

    monkeypatch.setattr(gen, "generate", fake_generate)
    judge = build_reward("judge", {}, policy=lambda: "the policy", tokenizer="tok")
    assert judge.score(["q1", "q2", "q3"], ["a", "b", "c"], ["r", None, None]) == [0.7, 1.0, 1.0]
    assert "q1" in seen[0][0][0]["content"] and "Response: a" in seen[0][0][0]["content"]
    with pytest.raises(ValueError, match="no score"):
        judge.score(["q"], ["a"], [None])


def test_judge_counts_unusable_replies_without_judging_again_and_shows_progress_on_a_terminal(monkeypatch, caplog):
    import io

    import tunelab.generate as gen
    from tunelab.rewards import judge as judge_module

    replies = {"a": "7", "b": "no idea", "c": "Score: 3"}  # by the response the rubric shows
    calls = []

    class Out:
        def __init__(self, texts):
            self.texts = texts

    def fake_generate(model, tok, prompts, cfg):
        calls.append(len(prompts))
        return Out([replies[p[0]["content"].split("Response: ")[1][0]] for p in prompts])

    bars = []

    class Bar:  # records what the judge's progress bar was asked to show
        def __init__(self, total, disable, **kw):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            self.n += k

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr(judge_module, "tqdm", Bar)
    monkeypatch.setattr("sys.stderr", Terminal())
    items = [record_to_prompt(Record({"prompt": "p", "answer": "x"}, "x:1"), None, None)] * 3
    comps = [Completion(0, [1], t, "stop") for t in ("a", "b", "c")]
    rs = RewardSet.from_specs(Recipe.model_validate({"rollout": {}, "rewards": [{"name": "judge"}]}).rewards,
                              policy=lambda: "the policy", tokenizer="tok")
    out = rs(items, comps)
    assert out.per_func[:, 0].tolist() == pytest.approx([0.7, 0.0, 0.3]) and out.errors == {"judge": 1}
    assert calls == [3]  # judged once: the unusable reply is not judged again one completion at a time
    assert "reward 'judge' failed on 1 of 3 completions" in caplog.text
    assert "1 of 3 judge replies had no score" in caplog.text and rs.error_totals == {"judge": 1}
    assert len(bars) == 1 and bars[0].total == 3 and not bars[0].disable and bars[0].n == 3  # a terminal: shown
    quiet = RewardSet.from_specs(Recipe.model_validate({"rollout": {}, "rewards": [{"name": "judge"}]}).rewards,
                                 policy=lambda: "the policy", tokenizer="tok", progress=False)
    quiet(items, comps)
    assert bars[-1].disable  # the caller's own bar is on screen (RL's training loop)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    rs(items, comps)
    assert bars[-1].disable and rs.error_totals == {"judge": 2}  # not a terminal: no bar


def test_reward_model_scores_with_a_sequence_classification_model(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = build_reward("reward_model", {"path": str(tmp_path / "rm")})
    a = rm.score(["hi", "hi"], ["hello there", "no"], [None, None])
    assert len(a) == 2 and all(math.isfinite(x) for x in a) and a[0] != a[1]
    assert rm.score(["hi"], ["hello there"], [None]) == pytest.approx([a[0]], abs=1e-4)  # padding changes nothing
