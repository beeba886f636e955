"""The iterate loop end to end on the tiny random model: files of a round, resume after a crash inside round 2,
SPIN on prompts only, a round that keeps nothing."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_recipe_dict

from tunelab.recipe import Recipe, RecipeError
from tunelab.rewards.scoring import RewardSet


def _recipe(model_dir, out, **iterate) -> Recipe:
    d = tiny_recipe_dict(model_dir, out, train={"max_steps": 4, "save_every": 2},
                         data={"train": {"builtin": "date_format", "n": 8}})
    d["export"] = {"adapter": False, "merged": True}
    d["iterate"] = {"strategy": "raft", "rounds": 2, "num_generations": 2, "max_completion_length": 6,
                    "generation_batch_size": 16, "rewards": [{"name": "task"}, {"name": "length"}], **iterate}
    return Recipe.model_validate(d)


def _count_generate(monkeypatch):
    from tunelab.iterate import sampling

    calls = []
    real = sampling.generate

    def counting(model, tokenizer, prompts, config, **kw):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, config, **kw)

    monkeypatch.setattr(sampling, "generate", counting)
    return calls


def test_raft_rounds_write_samples_data_runs_and_table(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.iterate import run_iterate

    calls = _count_generate(monkeypatch)
    summary = run_iterate(_recipe(tiny_model_dir, tmp_path))
    run = tmp_path / "tiny"
    assert len(calls) == 2  # one generation call per round
    for r in (1, 2):
        d = run / f"round-{r}"
        assert (d / "DONE").is_file() and (d / "round.json").is_file()
        samples = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and all(len(s["completions"]) == 2 and len(s["rewards"]) == 2 for s in samples)
        data = [json.loads(x) for x in (d / "data.jsonl").read_text().splitlines()]
        assert len(data) == 8 and all(rec["messages"][-1]["role"] == "assistant" for rec in data)  # best of 2 each
        assert (d / "run" / "export" / "merged" / "config.json").is_file()
        assert (d / "run" / "eval_after.json").is_file()
    # round 2 sampled from round 1's model and trained on from it (RAFT continues)
    r2 = json.loads((run / "round-2" / "round.json").read_text())
    assert r2["started_from"] == str(run / "round-1" / "run" / "export" / "merged")
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["base"]["round"] == 0
    assert all(row["kept"] == 8 and row["train_loss"] is not None for row in summary["rounds"])
    saved = json.loads((run / "summary.json").read_text())
    assert saved["rounds"] == summary["rounds"]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in steps] == [1] * 4 + [2] * 4 and steps[-1]["step"] == 8
    from tunelab.track.report import render_report

    page = render_report([run])
    assert "Self-improvement rounds" in page and "<th>train loss</th>" in page and "data:image/png;base64" in page


def test_cli_run_dispatches_an_iterate_recipe_and_the_run_dir_resumes(tiny_model_dir, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    path = tmp_path / "it.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, tmp_path, rounds=1).model_dump(mode="json")))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    assert "round  accuracy" in res.output and (tmp_path / "tiny" / "round-1" / "DONE").is_file()
    calls = _count_generate(monkeypatch)
    res = CliRunner().invoke(app, ["iterate", str(tmp_path / "tiny")])
    assert res.exit_code == 0, res.output
    assert "round 1: done (trained), read back" in res.output and calls == []
    res = CliRunner().invoke(app, ["iterate", "--help"])
    assert res.exit_code == 0 and all(s in res.output for s in ("rest_em", "self_rewarding", "star", "DONE"))


def test_a_round_trained_on_data_jsonl_is_an_ordinary_run(tiny_model_dir, tmp_path):
    """round-N/data.jsonl is in a format `tunelab run` reads as it is."""
    from tunelab.iterate import run_iterate
    from tunelab.runner import run_recipe

    run_iterate(_recipe(tiny_model_dir, tmp_path, rounds=1))
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "again", data={"train": {"path": str(
        tmp_path / "tiny" / "round-1" / "data.jsonl")}}, train={"max_steps": 1})
    d["export"] = {"adapter": False, "merged": False}
    assert run_recipe(Recipe.model_validate(d))["steps"] == 1


def test_resume_after_a_crash_in_round_2_recomputes_nothing_of_round_1(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.iterate import run_iterate
    from tunelab.objectives import sft

    clean = run_iterate(_recipe(tiny_model_dir, tmp_path / "clean"))

    class Crash(Exception):
        pass

    calls = _count_generate(monkeypatch)
    real = sft.SFT.compute
    run = tmp_path / "crashed" / "tiny"

    def crash_in_round_2(self, model, batch, ref=None):
        if (run / "round-2" / "run" / "checkpoints" / "step-000002").is_dir():  # the step after round 2's step 2
            raise Crash()
        return real(self, model, batch, ref)

    monkeypatch.setattr(sft.SFT, "compute", crash_in_round_2)
    recipe = _recipe(tiny_model_dir, tmp_path / "crashed")
    with pytest.raises(Crash):
        run_iterate(recipe)
    assert (run / "round-1" / "DONE").is_file() and not (run / "round-2" / "DONE").is_file()
    assert (run / "round-2" / "run" / "checkpoints" / "step-000002").is_dir()
    assert len(calls) == 2
    round1 = {p: p.stat().st_mtime_ns for p in (run / "round-1").rglob("*") if p.is_file()}
    samples2 = (run / "round-2" / "samples.jsonl").stat().st_mtime_ns

    monkeypatch.setattr(sft.SFT, "compute", real)
    resumed = run_iterate(recipe, run_dir=run, resume=True)
    assert len(calls) == 2  # no generation at all: round 1 is done, round 2's samples are read back
    assert {p: p.stat().st_mtime_ns for p in (run / "round-1").rglob("*") if p.is_file()} == round1
    assert (run / "round-2" / "samples.jsonl").stat().st_mtime_ns == samples2
    # round 2 resumed from its step-2 checkpoint and ended where the uninterrupted run did, bit for bit
    def losses(root):
        return [json.loads(x)["loss"] for x in (root / "round-2" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses(run) == losses(tmp_path / "clean" / "tiny")
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in clean["rounds"]]
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in clean["rounds"]]


def test_spin_on_prompts_only_fails_before_any_run_dir(tiny_model_dir, tmp_path):
    from tunelab.iterate import run_iterate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Say bye."}\n')
    d = _recipe(tiny_model_dir, tmp_path / "out", strategy="spin", rewards=[]).model_dump()
    d["data"]["train"] = {"path": str(prompts)}
    d["objective"] = {"name": "spin"}
    with pytest.raises(RecipeError, match=r"spin needs human responses.*2 of 2 prompts"):
        run_iterate(Recipe.model_validate(d))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_round_that_keeps_nothing_stops_or_skips_cleanly(tiny_model_dir, tmp_path, mode, capsys):
    from tunelab.iterate import run_iterate

    # the random model never answers a date right: correct_only keeps nothing
    recipe = _recipe(tiny_model_dir, tmp_path, selection="correct_only", on_empty_round=mode)
    summary = run_iterate(recipe)
    out = capsys.readouterr().out
    assert "round 1: kept no samples (correct_only over 16 completions of 8 prompts" in out
    run = tmp_path / "tiny"
    for r in ((1,) if mode == "stop" else (1, 2)):
        d = run / f"round-{r}"
        assert sorted(p.name for p in d.iterdir()) == ["DONE", "round.json", "samples.json", "samples.jsonl"]
    assert not (run / "round-2").exists() if mode == "stop" else True
    assert summary["stopped_early"] is (mode == "stop")
    assert [r["status"] for r in summary["rounds"]] == (["stopped"] if mode == "stop" else ["skipped", "skipped"])
    assert summary["final_model"] is None


def test_iterate_recipe_errors_name_the_field(tiny_model_dir, tmp_path):
    from tunelab.validate import validate_recipe

    with pytest.raises(RecipeError, match="iterate.rewards.0.name"):
        validate_recipe(_recipe(tiny_model_dir, tmp_path, rewards=[{"name": "nope"}]))
    with pytest.raises(RecipeError, match="trains on preference pairs"):
        validate_recipe(_recipe(tiny_model_dir, tmp_path, strategy="iterative_dpo"))
    with pytest.raises(RecipeError, match="self_rewarding ranks samples by the model's own judgement"):
        d = _recipe(tiny_model_dir, tmp_path, strategy="self_rewarding").model_dump()
        d["objective"] = {"name": "dpo"}
        validate_recipe(Recipe.model_validate(d))
    with pytest.raises(ValueError, match="builds SFT data"):
        _recipe(tiny_model_dir, tmp_path, selection="best_vs_worst")


def test_rest_em_restarts_from_the_base_but_samples_from_the_latest_model(tiny_model_dir, tmp_path):
    from tunelab.iterate import run_iterate

    # the random model is never right: keep every sample (the length penalty is > -10), one per prompt (the ReST-EM cap)
    summary = run_iterate(_recipe(tiny_model_dir, tmp_path, strategy="rest_em", selection="threshold", threshold=-10.0,
                                  max_per_prompt=1))
    run = tmp_path / "tiny"
    r1, r2 = (json.loads((run / f"round-{r}" / "round.json").read_text()) for r in (1, 2))
    assert r1["started_from"] == "base" and r2["started_from"] == "base"
    assert r1["samples"]["sampled_with"] == "base"
    assert r2["samples"]["sampled_with"] == str(run / "round-1" / "run" / "export" / "merged")
    assert [row["kept"] for row in summary["rounds"]] == [8, 8]


def test_iterative_dpo_writes_preference_pairs_and_trains_dpo(tiny_model_dir, tmp_path, capsys):
    from tunelab.iterate import run_iterate

    d = _recipe(tiny_model_dir, tmp_path, strategy="iterative_dpo", rounds=2, num_generations=3,
                rewards=[{"name": "length"}]).model_dump()
    d["objective"] = {"name": "dpo", "beta": 0.1}
    summary = run_iterate(Recipe.model_validate(d))
    out = capsys.readouterr().out
    # each round's DPO reference is the model that round starts from, named: the base, then round 1's merged model
    merged = tmp_path / "tiny" / "round-1" / "run" / "export" / "merged"
    assert f"reference: the starting model {tiny_model_dir} with the adapter disabled" in out
    assert f"reference: the starting model {merged} with the adapter disabled" in out
    assert "the base model with the adapter disabled" not in out
    pairs = [json.loads(x) for x in (tmp_path / "tiny" / "round-1" / "data.jsonl").read_text().splitlines()]
    assert pairs and all(set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"] for p in pairs)
    samples = [json.loads(x) for x in (tmp_path / "tiny" / "round-1" / "samples.jsonl").read_text().splitlines()]
    for p in pairs:  # chosen is its prompt's best sample, rejected its worst
        s = next(s for s in samples if s["messages"] == p["prompt"] and p["chosen"] in s["completions"])
        assert s["rewards"][s["completions"].index(p["chosen"])] == max(s["rewards"])
        assert s["rewards"][s["completions"].index(p["rejected"])] == min(s["rewards"])
    assert summary["rounds"][0]["kept"] == len(pairs) and summary["rounds"][0]["train_loss"] is not None


def test_self_rewarding_judges_with_the_policy_and_reports_agreement(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.iterate import run_iterate
    from tunelab.rewards import judge

    seen = []

    def fake_parse(text):  # the random model's replies carry no score: score them by their characters instead
        seen.append(text)
        return float(len(seen) % 6)  # a different score for each sample in turn

    monkeypatch.setattr(judge, "parse_score", fake_parse)
    d = _recipe(tiny_model_dir, tmp_path, strategy="self_rewarding", rounds=1, num_generations=3, rewards=[
        {"name": "judge", "model": "policy", "rubric": "Rate: {completion}", "scale": 5, "max_new_tokens": 4},
        {"name": "task", "weight": 0.0}]).model_dump()
    d["objective"] = {"name": "dpo"}
    summary = run_iterate(Recipe.model_validate(d))
    assert len(seen) == 8 * 3  # every sample judged once
    row = json.loads((tmp_path / "tiny" / "round-1" / "round.json").read_text())
    assert row["data"]["judge_pairs"] == 0 and row["data"]["judge_agreement"] is None  # never right: no pair to rank
    assert summary["rounds"][0]["kept"] == row["data"]["pairs"] > 0


def test_star_rationalizes_with_the_hint_and_trains_without_it(monkeypatch):
    from tunelab.data.prompts import load_prompts
    from tunelab.generate import GenerationOutput, GenerationStats
    from tunelab.generate import outputs as gen_outputs
    from tunelab.iterate import sampling
    from tunelab.iterate.select import select_samples, sft_record
    from tunelab.recipe import DataConfig, DatasetSpec
    from tunelab.recipe.iterate import IterateConfig

    items = load_prompts(DatasetSpec(builtin="date_format", n=3), DataConfig())
    asked = []

    def fake_generate(model, tokenizer, prompts, config, **kw):
        asked.append(prompts)
        n = config.num_return_sequences
        # plain prompts: always wrong; hinted prompts: right except for the second one
        texts = [[items[k].answer if "(Hint: the answer is" in p[-1]["content"] and k != 1 else "no idea"] * n
                 for k, p in enumerate(prompts)]
        if len(prompts) < len(items):  # the hinted call only carries the wrong prompts (all three here)
            raise AssertionError("every prompt was wrong: all three are asked again")
        comps = [gen_outputs.Completion(k, [1], t, "stop") for k, ts in enumerate(texts) for t in ts]
        return GenerationOutput(comps, GenerationStats())

    monkeypatch.setattr(sampling, "generate", fake_generate)
    it = IterateConfig(strategy="star", num_generations=2, rewards=[{"name": "task"}])
    rewards = RewardSet.from_specs(it.rewards, tokenizer=None, precision="fp32", device="cpu", policy=None)
    out = sampling.sample_round(None, None, items, it, rewards, seed=0, precision="fp32")
    assert len(asked) == 2 and all("Hint" in p[-1]["content"] for p in asked[1])
    assert out.stats["rationalized"] == 2
    kept = select_samples(out.groups, "correct_only")
    assert kept == [(0, 2), (2, 2)]  # the rationalized completions, after the two wrong samples
    rec = sft_record(out.groups[0], 2)
    assert "Hint" not in rec["messages"][-2]["content"] and rec["messages"][-1]["content"] == items[0].answer
