"""A plain exported reward-model directory (config.json: *ForSequenceClassification) given to `tunelab eval`,
`chat` and `generate`: pairwise metrics where there are pairs, else an error naming the problem; never a causal
LM built around its body with a random vocabulary head."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm") / "merged"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(out)  # what tunelab exports for `objective: reward`
    tok.save_pretrained(out)
    return out


def test_checkpoint_head_reads_the_architecture(rm_dir, tiny_model_dir):
    from tunelab.model import checkpoint_head
    from tunelab.recipe import ModelConfig

    assert checkpoint_head(ModelConfig(name_or_path=str(rm_dir))) == "sequence_classification"
    assert checkpoint_head(ModelConfig(name_or_path=str(tiny_model_dir))) == "causal_lm"
    assert checkpoint_head(ModelConfig(name_or_path="smollm2-135m-instruct")) == "causal_lm"


def test_eval_of_an_exported_reward_model_reports_pairwise_accuracy(rm_dir):
    res = runner.invoke(app, ["eval", str(rm_dir), "--task", "date_format_pref", "--n", "8"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output[res.output.index("{"): res.output.rindex("}") + 1])
    assert 0.0 <= shown["reward_accuracy"] <= 1.0 and shown["preference_accuracy"] == shown["reward_accuracy"]
    assert "rewards/margins" in shown and "exact_match" not in shown


def test_eval_of_a_reward_model_without_a_task_scores_the_quickstarts_pairs(rm_dir):
    res = runner.invoke(app, ["eval", str(rm_dir), "--n", "8"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output[res.output.index("{"): res.output.rindex("}") + 1])
    assert shown["data"] == "date_format_pref" and 0.0 <= shown["reward_accuracy"] <= 1.0


@pytest.mark.parametrize("args", [
    ["eval", "{rm}", "--task", "date_format"],  # a held-out task without pairs
    ["eval", "{rm}", "--tasks", "date_format"],
    ["chat", "{rm}"],
    ["generate", "{rm}", "-i", "{prompts}", "-o", "{out}"],
])
def test_commands_that_need_a_language_model_refuse_a_reward_model(rm_dir, tmp_path, args):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, [a.format(rm=rm_dir, prompts=prompts, out=out) for a in args], input="Hi\n")
    assert res.exit_code == 2, res.output
    assert f"error: {rm_dir} is a reward model (LlamaForSequenceClassification" in " ".join(res.output.split())
    assert "--task date_format_pref" in res.output and not out.exists()
