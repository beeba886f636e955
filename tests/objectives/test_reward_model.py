"""`objective: reward`: the Bradley-Terry loss against TRL 1.16's RewardTrainer and by hand, the per-pair margin
through the data layer, the scalar head under each kind of method, and a tiny reward model trained, exported (a
sequence-classification checkpoint transformers loads and scores identically) and used as a GRPO reward."""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_recipe_dict

from tunelab.data.batching import collate_preference
from tunelab.data.formats import DataError, Record, to_example
from tunelab.objectives.base import build_objective
from tunelab.objectives.preference_losses import bradley_terry
from tunelab.recipe import ModelConfig, Recipe

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import RewardTrainer

PAIR_DATA = {"train": {"builtin": "date_format_pref", "n": 64},
             "eval": {"builtin": "date_format_pref", "split": "eval", "n": 16}}


class FakeScalarModel(torch.nn.Module):
    """Returns fixed rewards as `.logits` [2B, 1] whatever the input (rows [:B] chosen, [B:] rejected)."""

    def __init__(self, rewards: torch.Tensor):
        super().__init__()
        self.rewards = rewards

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.rewards.unsqueeze(-1))


def trl_reward_loss(rewards: torch.Tensor, margin: torch.Tensor | None, center: float | None) -> float:
    """TRL 1.16's `RewardTrainer.compute_loss` on a trainer made with `object.__new__` (no __init__), with exactly
    the attributes it reads, and a model whose logits are `rewards` [2B]."""
    trainer = object.__new__(RewardTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.args = SimpleNamespace(center_rewards_coefficient=center)
    trainer.accelerator = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    n = rewards.numel()
    inputs = {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return float(trainer.compute_loss(FakeScalarModel(rewards), inputs))


def pair_batch(b: int, margin: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    batch = {f"{side}_{k}": torch.ones(b, 3, dtype=torch.long) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask")}
    if margin is not None:
        batch["margin"] = margin
    return batch


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_loss_equals_trl_reward_trainer(with_margin, center):
    g = torch.Generator().manual_seed(3)
    b = 7
    rewards = torch.randn(2 * b, generator=g, dtype=torch.float64) * 3
    margin = torch.rand(b, generator=g, dtype=torch.float64) * 2 if with_margin else None
    trl = trl_reward_loss(rewards, margin, center)
    ours = bradley_terry(rewards[:b], rewards[b:], margin, center).losses.mean()
    assert abs(float(ours) - trl) <= 1e-12
    # the objective through a model: the loss SUM over pairs, n_units = pairs (the loop divides)
    opts = {"center_rewards_coefficient": center} if center is not None else {}
    out = build_objective("reward", opts).compute(FakeScalarModel(rewards), pair_batch(b, margin))
    assert int(out.n_units) == b
    assert abs(float(out.loss_sum) / b - trl) <= 1e-12
    acc = float((rewards[:b] > rewards[b:]).double().mean())
    assert float(out.metrics["rewards/accuracies"]) / b == pytest.approx(acc)
    assert float(out.metrics["rewards/margins"]) / b == pytest.approx(float((rewards[:b] - rewards[b:]).mean()))


def test_margin_and_centring_by_hand():
    r_c, r_r = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    m = torch.tensor([0.5, 0.0, -1.0])
    # -log sigma(x) = log(1 + e^-x): x = 0.5, -0.5, 1.0
    expected = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5)), math.log1p(math.exp(-1.0))]
    res = bradley_terry(r_c, r_r, m)
    torch.testing.assert_close(res.losses, torch.tensor(expected), atol=1e-6, rtol=0)
    # centring: + c (r_c + r_r)^2 = 0.1 * (1, 2.25, 16)
    res = bradley_terry(r_c, r_r, m, center_rewards_coefficient=0.1)
    torch.testing.assert_close(res.losses, torch.tensor(expected) + torch.tensor([0.1, 0.225, 1.6]), atol=1e-6,
                               rtol=0)
    # without a margin the first pair's loss is -log sigma(1)
    assert float(bradley_terry(r_c, r_r).losses[0]) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)


def test_margin_field_reaches_the_batch(tiny_tokenizer):
    from tunelab.data.encode import encode_examples

    rec = lambda i, **kw: Record({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": f"{i}", **kw},  # noqa: E731
                                 f"pairs.jsonl:{i}")
    exs = [to_example(rec(5, margin=1.5), "preference"), to_example(rec(6, margin=0), "preference")]
    assert [e.margin for e in exs] == [1.5, 0.0]
    enc, _ = encode_examples(tiny_tokenizer, exs, max_length=64, truncation="drop", loss_mask="completion")
    batch = collate_preference(enc, tiny_tokenizer.pad_token_id)
    torch.testing.assert_close(batch["margin"], torch.tensor([1.5, 0.0]))
    plain, _ = encode_examples(tiny_tokenizer, [to_example(rec(7), "preference")], max_length=64, truncation="drop",
                               loss_mask="completion")
    assert "margin" not in collate_preference(plain, tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="margin"):
        collate_preference(enc + plain, tiny_tokenizer.pad_token_id)
    with pytest.raises(DataError, match=r"pairs.jsonl:8: field 'margin' must be a number"):
        to_example(rec(8, margin="high"), "preference")


# -- the scalar head -------------------------------------------------------------------------------------------


def test_head_is_loaded_deterministically_with_the_pad_id(tiny_model_dir, tiny_tokenizer):
    from tunelab.model import load_model, model_head

    a = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), head="sequence_classification")
    b = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), head="sequence_classification")
    assert type(a).__name__ == "LlamaForSequenceClassification" and model_head(a) == "sequence_classification"
    assert a.config.num_labels == 1 and a.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert float(a.score.weight.detach().std()) > 0
    torch.testing.assert_close(a.score.weight, b.score.weight, atol=0, rtol=0)  # not the global RNG's draw
    assert model_head(load_model(ModelConfig(name_or_path=str(tiny_model_dir)))) == "causal_lm"


@pytest.mark.parametrize("method", ["lora", "freeze", "bitfit", "full"])
def test_the_head_trains_under_every_kind_of_method(tiny_model_dir, tmp_path, method):
    from tunelab.assemble import assemble

    recipe = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, data=PAIR_DATA,
                                                    objective={"name": "reward"}, method={"name": method}))
    model = assemble(recipe)[0].model
    head = {n: p.requires_grad for n, p in model.named_parameters() if n.startswith("score.") or ".score." in n}
    assert any(head.values()), head
    if method == "lora":  # PEFT's SEQ_CLS task: a trained copy of the head beside the adapter (modules_to_save)
        assert model.peft_config["default"].task_type == "SEQ_CLS"
        assert "score" in model.peft_config["default"].modules_to_save
        assert any("modules_to_save" in n and trains for n, trains in head.items())


# -- end to end: train, export, load with transformers, score as a GRPO reward ---------------------------------


@pytest.fixture(scope="module")
def rm_run(tiny_model_dir, tmp_path_factory):
    from tunelab.runner import run_recipe

    out = tmp_path_factory.mktemp("rm")
    recipe = Recipe.model_validate(tiny_recipe_dict(
        tiny_model_dir, out, name="rm", data=PAIR_DATA, objective={"name": "reward"}, train={"max_steps": 8},
        export={"adapter": True, "merged": True, "gguf": ["f16"]}))
    return run_recipe(recipe)


def test_run_reports_pairwise_accuracy_like_dpo(rm_run):
    before, after = rm_run["before"], rm_run["after"]
    for ev in (before, after):
        assert {"reward_accuracy", "preference_accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "pref_eval_loss"} <= set(ev)
        assert ev["preference_accuracy"] == ev["reward_accuracy"]  # a reward model prefers what it scores higher
        assert "exact_match" not in ev  # no generation from a scalar head
    assert after["pref_eval_loss"] < before["pref_eval_loss"]
    assert after["rewards/margins"] > before["rewards/margins"]
    assert rm_run["exports"]["gguf"].startswith("skipped: a reward model")


def test_tunelab_eval_of_a_reward_run(rm_run):
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["eval", rm_run["run_dir"], "--n", "16"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output[res.output.index("{"): res.output.rindex("}") + 1])
    assert shown["reward_accuracy"] == pytest.approx(rm_run["after"]["reward_accuracy"])
    assert "exact_match" not in shown


def test_export_loads_with_transformers_and_scores_identically(rm_run):
    from transformers import AutoModelForSequenceClassification

    from tunelab.assemble import restore_run
    from tunelab.data.pipeline import encode_spec
    from tunelab.export import export_run
    from tunelab.objectives.reward import pair_rewards

    run_dir = Path(rm_run["run_dir"])
    export_run(run_dir, adapter=False)  # `tunelab export RUN`: the merged model again, from the latest checkpoint
    restored = restore_run(run_dir)
    pairs, _ = encode_spec(restored.tokenizer, restored.recipe.data.eval, restored.recipe.data)
    batch = collate_preference(pairs[:8], restored.tokenizer.pad_token_id)
    exported = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "merged").eval()
    assert exported.config.num_labels == 1 and exported.config.pad_token_id == restored.tokenizer.pad_token_id
    with torch.no_grad():
        ours_c, ours_r = pair_rewards(restored.model.eval(), batch)
        theirs_c, theirs_r = pair_rewards(exported, batch)
    torch.testing.assert_close(theirs_c, ours_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_r, ours_r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_c, ours_r)
    adapter = json.loads((run_dir / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]


def test_exported_reward_model_is_a_grpo_reward(rm_run, tiny_model_dir, tmp_path):
    from tunelab.data.encode import render
    from tunelab.rewards.base import build_reward
    from tunelab.runner import run_recipe
    from tunelab.validate import validate_recipe

    merged = Path(rm_run["run_dir"]) / "export" / "merged"
    rm = build_reward("reward_model", {"path": str(merged)})
    scores = rm.score(["Rewrite the date 'May 4, 2001' in YYYY-MM-DD format."] * 2, ["2001-05-04", "4 May 2001"],
                      [None, None])
    # the reward is the exported model's logit on the rendered chat, as the objective scored training pairs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(merged), AutoModelForSequenceClassification.from_pretrained(merged)
    text = render(tok, [{"role": "user", "content": "Rewrite the date 'May 4, 2001' in YYYY-MM-DD format."},
                        {"role": "assistant", "content": "2001-05-04"}])
    with torch.no_grad():
        direct = float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
    assert scores[0] == pytest.approx(direct, abs=1e-5) and scores[0] != scores[1]

    recipe = validate_recipe(Recipe.model_validate(tiny_recipe_dict(
        tiny_model_dir, tmp_path, name="grpo-rm", objective={"name": "grpo", "beta": 0.0},
        rollout={"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 6},
        rewards=[{"name": "reward_model", "path": str(merged)}], train={"max_steps": 2},
        eval={"before": False, "after": False}, export={"adapter": False, "merged": False})))
    summary = run_recipe(recipe)
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("rewards/reward_model/mean" in r for r in rows)
    assert all(r["rewards/reward_model/std"] > 0 for r in rows)  # the model told the completions apart
