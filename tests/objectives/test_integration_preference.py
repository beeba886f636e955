"""Preference objectives in the real pipeline: references (adapter, copy, cache), DPO in the loop, the built-in
preference tasks, and bad preference data."""

import copy
import json
import math

import pytest
import torch
from tiny import tiny_recipe_dict
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.batching import collate_preference
from tunelab.data.formats import DataError
from tunelab.objectives.base import build_objective
from tunelab.objectives.reference_cache import (
    attach_reference_logps,
    cache_path,
    collate_preference_with_reference,
    load_reference_logps,
    needs_reference_logps,
    pairs_fingerprint,
    precompute_reference_logps,
)
from tunelab.objectives.references import FrozenCopyReference
from tunelab.recipe import Recipe

V = 96
LOG2 = math.log(2.0)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V)
    return LlamaForCausalLM(cfg).eval()


def encoded_pairs(n=6, seed=0):
    """Encoded pairs as the pipeline makes them: lists of ids, labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(1, V, (k,), generator=g).tolist()  # noqa: E731
    out = []
    for i in range(n):
        p, c, r = rnd(2 + i % 3), rnd(2 + i % 4), rnd(3 + i % 2)
        out.append({"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c,
                    "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r})
    return out


# -- references: adapter disabled == frozen copy == cache ------------------------------------------


def test_lora_reference_equals_frozen_copy_and_cache(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    base_copy = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # B != 0: policy != reference
    pairs = encoded_pairs()
    batch = collate_preference(pairs, pad_id=0)
    cache = precompute_reference_logps(base_copy, pairs, batch_size=4, cache_dir=tmp_path, model_key="tiny")
    dpo = build_objective("dpo", {"beta": 0.1})
    results = {}
    for how in ("adapter", "copy", "cache"):
        peft_model.zero_grad()
        ref = FrozenCopyReference(base_copy) if how == "copy" else None
        b = collate_preference_with_reference(attach_reference_logps(copy.deepcopy(pairs), cache), 0) \
            if how == "cache" else batch
        out = dpo.compute(peft_model, b, ref)
        out.loss_sum.backward()
        g = torch.cat([p.grad.flatten() for n, p in peft_model.named_parameters() if p.grad is not None])
        results[how] = (float(out.loss_sum), g, {k: float(v) for k, v in out.metrics.items()})
    loss_a, g_a, m_a = results["adapter"]
    assert abs(loss_a - 6 * LOG2) > 1e-3  # the adapter really moved the policy away from its reference
    for how in ("copy", "cache"):
        loss, g, m = results[how]
        assert abs(loss - loss_a) < 1e-6
        torch.testing.assert_close(g, g_a, atol=1e-7, rtol=1e-5)
        assert all(abs(m[k] - m_a[k]) < 1e-5 for k in m_a)


def test_cache_file_hash_and_reuse(tmp_path):
    model = tiny_llama()
    pairs = encoded_pairs()
    out = precompute_reference_logps(model, pairs, batch_size=4, cache_dir=tmp_path, model_key="m", precision="fp32")
    fp = pairs_fingerprint(pairs, "m|fp32")
    path = cache_path(tmp_path, fp)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
    # per example, in order: the summed response log-probs of a forward of that pair alone
    one = FrozenCopyReference(model).logps(collate_preference(pairs[3:4], 0))
    assert abs(float(out["ref_chosen_logps"][3] - one[0])) < 1e-5
    assert abs(float(out["ref_rejected_logps"][3] - one[1])) < 1e-5

    class Boom(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the cache should have been used")

        def parameters(self, recurse=True):
            return model.parameters()

    again = precompute_reference_logps(Boom(), pairs, cache_dir=tmp_path, model_key="m", precision="fp32")
    assert all(torch.equal(again[k], out[k]) for k in out)
    # other data, other model key: another file, never the stale one
    changed = copy.deepcopy(pairs)
    changed[0]["chosen_input_ids"][-1] = (changed[0]["chosen_input_ids"][-1] + 1) % V
    assert pairs_fingerprint(changed, "m|fp32") != fp and pairs_fingerprint(pairs, "other|fp32") != fp
    assert load_reference_logps(path, pairs_fingerprint(changed, "m|fp32")) is None
    assert load_reference_logps(path, fp, n=5) is None


def test_collator_with_reference_keys():
    pairs = attach_reference_logps(encoded_pairs(3), {"ref_chosen_logps": torch.tensor([-1.0, -2.0, -3.0]),
                                                      "ref_rejected_logps": torch.tensor([-4.0, -5.0, -6.0])})
    b = collate_preference_with_reference(pairs, 0)
    assert b["ref_chosen_logps"].tolist() == [-1.0, -2.0, -3.0] and b["ref_rejected_logps"].dtype == torch.float32
    plain = collate_preference_with_reference(encoded_pairs(3), 0)
    assert "ref_chosen_logps" not in plain
    with pytest.raises(ValueError, match="some examples"):
        collate_preference_with_reference(pairs[:1] + encoded_pairs(2), 0)
    with pytest.raises(ValueError, match="cached reference values"):
        attach_reference_logps(encoded_pairs(2), {"ref_chosen_logps": torch.zeros(3),
                                                  "ref_rejected_logps": torch.zeros(3)})


# -- DPO through the runner and the loop ------------------------------------------------------------


def write_pairs(path, n, seed=0):
    """A separable preference set: chosen is always a terse ISO date, rejected always a sentence.

    (ISO-date strings stay strings: see test_iso_date_strings_stay_strings.)
    """
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
            f.write(json.dumps({"prompt": f"Rewrite the date '{d} {m} {y}' in YYYY-MM-DD format.",
                                "chosen": f"ISO {y}-{m:02d}-{d:02d}", "rejected": f"The date is {d} {m} {y}."}) + "\n")
    return path


def _metrics(ws):
    return [json.loads(x) for x in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_lora_raises_reward_accuracy(tiny_model_dir, tmp_path):
    from tunelab.runner import open_workspace, train_workspace

    data = write_pairs(tmp_path / "pairs.jsonl", 32)
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective={"name": "dpo", "beta": 0.1},
                         data={"train": {"path": str(data)}, "eval": None},
                         train={"max_steps": 8, "lr": 1e-2, "batch_size": 4})
    ws = open_workspace(Recipe.model_validate(d))
    assert needs_reference_logps(ws.objective, ws.method) is False  # LoRA: the reference is the adapter-off base
    train_workspace(ws)
    lines = _metrics(ws)
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"}
    assert all(keys <= set(x) for x in lines)
    first, last = lines[0], lines[-5:]
    assert abs(first["loss"] - LOG2) < 1e-5 and first["rewards/accuracies"] == 0.0  # policy == reference at step 1
    acc = sum(x["rewards/accuracies"] for x in last) / len(last)
    assert acc > 0.9
    assert all(x["rewards/margins"] > 0 and x["loss"] < LOG2 for x in last)
    x = last[-1]  # the loop divides sums by pairs: margins = chosen - rejected per pair
    assert abs(x["rewards/margins"] - (x["rewards/chosen"] - x["rewards/rejected"])) < 1e-5


def _losses(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_full_finetune_uses_the_reference_cache(tiny_model_dir, tmp_path, monkeypatch):
    """Full fine-tuning + DPO through the runner: reference log-probs precomputed once and cached in the run
    directory (training and eval pairs), equal step by step to training against an explicit frozen copy."""
    import tunelab.runner.workspace as runner
    from tunelab.runner import open_workspace, run_recipe

    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    held = write_pairs(tmp_path / "held.jsonl", 6, seed=1)
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective={"name": "dpo"}, method={"name": "full"},
                         data={"train": {"path": str(data)}, "eval": {"path": str(held)}},
                         train={"max_steps": 4, "lr": 1e-3, "batch_size": 4}, export={"merged": False},
                         eval={"before": False})
    ws = open_workspace(Recipe.model_validate({**d, "name": "bare"}))
    assert needs_reference_logps(ws.objective, ws.method)
    with pytest.raises(ValueError, match="needs a reference"):  # no adapter, no cache: a clear error
        ws.objective.compute(ws.model, collate_preference(ws.train_data[:2], ws.tokenizer.pad_token_id))

    cached = run_recipe(Recipe.model_validate({**d, "name": "cached"}))
    run_dir = tmp_path / "runs" / "cached"
    assert len(list(run_dir.glob("reference_logps-*.safetensors"))) == 2  # train pairs + eval pairs
    lines = _losses(run_dir)
    # step 1: the cached values are exactly the initial policy's, so DPO starts at log 2 with zero rewards
    assert abs(lines[0]["loss"] - LOG2) < 1e-5 and abs(lines[0]["rewards/chosen"]) < 1e-6
    assert lines[-1]["rewards/margins"] > 0 and lines[-1]["loss"] < LOG2
    assert cached["after"]["pairs"] == 6 and "reward_accuracy" in cached["after"]

    def frozen_copy(ws):  # the explicit alternative: a second model in memory, run at every step
        ws.ref = FrozenCopyReference(copy.deepcopy(ws.model))

    monkeypatch.setattr(runner, "setup_reference", frozen_copy)
    explicit = run_recipe(Recipe.model_validate({**d, "name": "copy"}))
    assert not list((tmp_path / "runs" / "copy").glob("reference_logps-*"))
    for a, b in zip(lines, _losses(tmp_path / "runs" / "copy"), strict=True):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    for k in ("reward_accuracy", "preference_accuracy", "rewards/margins", "pref_eval_loss"):
        assert abs(cached["after"][k] - explicit["after"][k]) < 1e-5, k


@pytest.mark.parametrize("objective,method,expect", [
    ({"name": "kto"}, {"name": "full"}, "a frozen copy of the starting model {model}"),
    ({"name": "asft"}, {"name": "full"}, "a frozen copy of the starting model {model}"),
    ({"name": "kto"}, {"name": "lora", "r": 4}, "the starting model {model} with the adapter disabled"),
    ({"name": "dpo"}, {"name": "lora", "r": 4}, "the starting model {model} with the adapter disabled"),
])
def test_runner_picks_the_reference(objective, method, expect, tiny_model_dir, tmp_path, capsys):
    from tunelab.objectives.references import FrozenCopyReference
    from tunelab.runner import open_workspace, train_workspace

    pairs = objective["name"] != "asft"
    train = {"path": str(write_pairs(tmp_path / "pairs.jsonl", 8))} if pairs else {"builtin": "date_format", "n": 8}
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective=objective, method=method,
                         data={"train": train, "eval": None}, train={"max_steps": 2, "lr": 1e-3, "batch_size": 4})
    ws = open_workspace(Recipe.model_validate(d))
    model, result, _ = train_workspace(ws)
    assert f"reference: {expect.format(model=tiny_model_dir)}" in capsys.readouterr().out  # the model it really is
    assert math.isfinite(result.final_loss)
    if "copy" in expect:
        assert isinstance(ws.ref, FrozenCopyReference) and ws.ref.model is not model
        assert not any(p.requires_grad for p in ws.ref.model.parameters())
    else:
        assert ws.ref is None


def test_distill_teacher_from_the_recipe(tiny_model_dir, tmp_path, capsys):
    from tunelab.runner import open_workspace, train_workspace

    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs",
                         objective={"name": "distill", "teacher": str(tiny_model_dir)},
                         data={"train": {"builtin": "date_format", "n": 8}, "eval": None},
                         train={"max_steps": 2, "batch_size": 4})
    ws = open_workspace(Recipe.model_validate(d))
    _, result, _ = train_workspace(ws)
    assert f"reference: the teacher {tiny_model_dir}" in capsys.readouterr().out
    lines = _losses(ws.run_dir)
    assert lines[0]["kl"] < 1e-6  # the teacher is the same checkpoint: LoRA starts as the teacher


# -- the built-in preference tasks ------------------------------------------------------------------


def test_preference_task_items():
    from tunelab.data.builtin import get_task
    from tunelab.data.builtin.base import generate, split_of
    from tunelab.data.builtin.preference import PREFERENCE_TASKS, to_preference_records

    assert set(PREFERENCE_TASKS) == {"date_format_pref", "arithmetic_pref", "sort_numbers_pref",
                                     "reverse_words_pref", "acronym_pref"}
    for name, task in PREFERENCE_TASKS.items():
        base = get_task(name.removesuffix("_pref"))
        items = generate(task, "train", 60, seed=1)
        assert items == generate(task, "train", 60, seed=1)
        for it in items:
            assert base.check(it.answer, it.answer) and not base.check(it.rejected, it.answer)
            assert split_of(it.prompt) == "train"
        recs = to_preference_records(items)
        assert set(recs[0]) == {"prompt", "chosen", "rejected", "answer"} and recs[0]["chosen"] == recs[0]["answer"]
        assert all(split_of(it.prompt) == "eval" for it in generate(task, "eval", 20))
        assert task.skill != base.skill  # the registry's skills stay distinct
    # date mistakes are the plausible ones: one day/month off, swapped, unpadded, reordered, in a sentence
    kinds = {it.kind for it in generate(PREFERENCE_TASKS["date_format_pref"], "train", 200)}
    assert kinds == {"day_off_by_one", "month_off_by_one", "month_day_swapped", "no_zero_padding", "day_first",
                     "sentence"}
    it = next(i for i in generate(PREFERENCE_TASKS["date_format_pref"], "train", 200) if i.kind == "day_off_by_one")
    import datetime as dt

    assert abs((dt.date.fromisoformat(it.rejected) - dt.date.fromisoformat(it.answer)).days) == 1


def test_preference_tasks_are_registered():
    from tunelab.data.builtin import get_task, list_tasks
    from tunelab.data.builtin.base import generate, to_records
    from tunelab.data.builtin.preference import PREFERENCE_TASKS

    names = [t.name for t in list_tasks()]
    assert set(PREFERENCE_TASKS) <= set(names) and names.index("date_format") < names.index("date_format_pref")
    task = get_task("date_format_pref")
    rec = to_records(generate(task, "eval", 1))[0]
    assert set(rec) == {"prompt", "chosen", "rejected", "answer"}
    assert task.check(rec["chosen"], rec["answer"]) and not task.check(rec["rejected"], rec["answer"])


def test_preference_eval_items_score_the_base_task(tiny_model_dir):
    from tunelab.data.pipeline import eval_items
    from tunelab.evaluate.tasks import checker_for
    from tunelab.recipe import DataConfig, DatasetSpec

    items = eval_items(DatasetSpec(builtin="date_format_pref", split="eval", n=5), DataConfig())
    assert len(items) == 5 and all(it.task == "date_format_pref" for it in items)
    assert items[0].messages == [{"role": "user", "content": items[0].messages[0]["content"]}]
    assert "YYYY-MM-DD" in items[0].messages[0]["content"]
    check = checker_for("date_format_pref")
    assert check(items[0].answer, items[0].answer) and not check(f"The date is {items[0].answer}.", items[0].answer)


@pytest.mark.slow
def test_tunelab_run_dpo_recipe_end_to_end(tiny_model_dir, tmp_path):
    """`tunelab run` with a DPO recipe on a built-in preference task: before/after exact match of the base
    task, reward accuracy and preference accuracy, in the table and in summary.json."""
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective={"name": "dpo", "beta": 0.1, "rpo_alpha": 1.0},
                         data={"train": {"builtin": "date_format_pref", "n": 16},
                               "eval": {"builtin": "date_format_pref", "split": "eval", "n": 4}},
                         train={"max_steps": 3, "batch_size": 4, "lr": 1e-2}, name="dpo-e2e")
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    for row in ("exact match", "reward accuracy", "preference accuracy", "log-prob chosen"):
        assert row in res.output
    assert "perplexity" not in res.output and "held-out loss" not in res.output  # pairs: no perplexity
    run = tmp_path / "runs" / "dpo-e2e"
    summary = json.loads((run / "summary.json").read_text())
    for when in ("before", "after"):
        m = summary[when]
        assert {"exact_match", "reward_accuracy", "preference_accuracy", "logps/chosen", "nll"} <= set(m)
        assert m["pairs"] == 4 and "perplexity" not in m and "eval_loss" not in m
    assert summary["before"]["reward_accuracy"] == 0.0  # the policy is its own reference before training
    assert abs(summary["before"]["pref_eval_loss"] - summary["before"]["nll"] - LOG2) < 1e-5  # log 2 + alpha * nll
    assert summary["after"]["rewards/margins"] > 0
    lines = _losses(run)
    assert "nll" in lines[0] and (run / "export" / "adapter" / "adapter_config.json").is_file()
    res = CliRunner().invoke(app, ["eval", str(run), "--n", "4"])  # a preference run's eval data: pairs
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["pairs"] == 4 and 0 <= out["preference_accuracy"] <= 1 and "exact_match" in out
    assert "perplexity" not in out


# -- bad preference data --------------------------------------------------------------------------


def _encode(tiny_tokenizer, path, **data):
    from tunelab.data.pipeline import encode_spec
    from tunelab.recipe import DataConfig, DatasetSpec

    cfg = DataConfig(train=DatasetSpec(path=str(path)), eval=None, **data)
    return encode_spec(tiny_tokenizer, cfg.train, cfg)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def test_missing_field_names_file_line_and_field(tiny_tokenizer, tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "What is 1 + 1?", "chosen": "2"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        _encode(tiny_tokenizer, p)


def test_identical_chosen_and_rejected_is_an_error(tiny_tokenizer, tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [GOOD, GOOD, {"prompt": "Hi", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"p\.jsonl:3: fields 'chosen' and 'rejected' are identical"):
        _encode(tiny_tokenizer, p)


def test_iso_date_strings_stay_strings(tiny_tokenizer, tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Rewrite March 5, 2021.", "chosen": "2021-03-05", "rejected": "x"}])
    encoded, _ = _encode(tiny_tokenizer, p)
    assert len(encoded) == 1


def test_pair_whose_prompt_fills_max_length_is_dropped_counted_or_an_error(tiny_tokenizer, tmp_path):
    long = {"prompt": "What is the date? " * 40, "chosen": "4", "rejected": "5"}
    p = _jsonl(tmp_path / "p.jsonl", [GOOD, long, GOOD])
    encoded, stats = _encode(tiny_tokenizer, p, max_length=64, truncation="drop")
    assert len(encoded) == 2 and stats.dropped_too_long == 1 and stats.kept == 2
    assert "2 kept, 1 dropped as too long" in stats.summary()
    # right (TRL's keep_start): the prompt alone fills max_length, no response token is left: dropped as TRL does
    encoded, stats = _encode(tiny_tokenizer, p, max_length=64, truncation="right")
    assert len(encoded) == 2 and stats.dropped_no_target == 1 and stats.dropped_too_long == 0 and stats.kept == 2
    assert "2 kept, 0 dropped as too long, 0 truncated, 1 dropped with no target token left" in stats.summary()
    # left (keep_end): the responses survive, the prompt's start is cut
    encoded, stats = _encode(tiny_tokenizer, p, max_length=64, truncation="left")
    assert len(encoded) == 3 and stats.truncated == 1 and stats.kept == 3
    assert all(len(encoded[1][f"{s}_input_ids"]) == 64 for s in ("chosen", "rejected"))
    with pytest.raises(DataError, match=r"p\.jsonl:2: chosen has \d+ tokens > data.max_length=64"):
        _encode(tiny_tokenizer, p, max_length=64, truncation="error")
    only_long = _jsonl(tmp_path / "long.jsonl", [long])
    with pytest.raises(DataError, match="nothing left after encoding.*1 dropped as too long"):
        _encode(tiny_tokenizer, only_long, max_length=64, truncation="drop")
    with pytest.raises(DataError, match="nothing left after encoding.*1 dropped with no target token left"):
        _encode(tiny_tokenizer, only_long, max_length=64)


def test_over_long_pair_is_cut_like_trl_dpo_keep_start(tiny_tokenizer, tmp_path):
    """data.truncation: right cuts each side of a pair to max_length on its own, keeping the prompt (TRL 1.16's
    DataCollatorForPreference, truncation_mode="keep_start"); the labels are those of the uncut pair."""
    pair = {"prompt": "What is the date?", "chosen": "It is the fifth of March. " * 30, "rejected": "No idea."}
    p = _jsonl(tmp_path / "p.jsonl", [pair, GOOD])
    full, _ = _encode(tiny_tokenizer, p, max_length=10_000, truncation="error")
    max_length = 64
    assert len(full[0]["chosen_input_ids"]) > max_length > len(full[0]["rejected_input_ids"])
    encoded, stats = _encode(tiny_tokenizer, p, max_length=max_length)
    assert len(encoded) == 2 and stats.truncated == 1 and stats.kept == 2 and stats.dropped_too_long == 0
    assert "2 kept, 0 dropped as too long, 1 truncated" in stats.summary()
    cut, whole = encoded[0], full[0]
    assert cut["chosen_input_ids"] == whole["chosen_input_ids"][:max_length]
    assert cut["chosen_labels"] == whole["chosen_labels"][:max_length]
    assert cut["rejected_input_ids"] == whole["rejected_input_ids"]  # the side that fits is untouched
    n_prompt = whole["chosen_labels"].index(next(lab for lab in whole["chosen_labels"] if lab != -100))
    assert cut["chosen_input_ids"][:n_prompt] == cut["rejected_input_ids"][:n_prompt]  # the same whole prompt
    assert any(lab != -100 for lab in cut["chosen_labels"][n_prompt:])
    # left (keep_end): the end of each over-long side
    left, lstats = _encode(tiny_tokenizer, p, max_length=max_length, truncation="left")
    assert left[0]["chosen_input_ids"] == whole["chosen_input_ids"][-max_length:] and lstats.truncated == 1
    # drop keeps its meaning
    dropped, dstats = _encode(tiny_tokenizer, p, max_length=max_length, truncation="drop")
    assert len(dropped) == 1 and dstats.dropped_too_long == 1 and dstats.truncated == 0


def test_over_long_pairs_are_logged_by_the_runner(tiny_model_dir, tmp_path, capsys):
    from tunelab.runner import open_workspace

    long = {"prompt": "What is the date? " * 40, "chosen": "4", "rejected": "5"}
    cut = {"prompt": "What is the date?", "chosen": "It is the fifth of March. " * 30, "rejected": "No idea."}
    p = _jsonl(tmp_path / "p.jsonl", [GOOD, long, GOOD, cut, GOOD])
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective={"name": "dpo"},
                         data={"train": {"path": str(p)}, "eval": None, "max_length": 64})
    ws = open_workspace(Recipe.model_validate(d))
    assert len(ws.train_data) == 4
    assert "train data: 4 kept, 0 dropped as too long, 1 truncated, 1 dropped with no target token left" in \
        capsys.readouterr().out
    assert ws.data_stats["train"] == {"kept": 4, "dropped_too_long": 0, "truncated": 1, "dropped_no_target": 1}


def test_dpo_rpo_alpha_adds_the_chosen_nll():
    from peft import LoraConfig, get_peft_model

    from tunelab.objectives.references import pair_logps

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    batch = collate_preference(encoded_pairs(), pad_id=0)
    plain = build_objective("dpo", {}).compute(model, batch)
    rpo = build_objective("dpo", {"rpo_alpha": 0.5}).compute(model, batch)
    with torch.no_grad():
        pol_c, _, n_c, _ = pair_logps(model, batch)
    nll = float((-pol_c / n_c).sum())  # per pair: the chosen response's NLL per token
    assert nll > 1.0 and "nll" not in plain.metrics
    assert abs(float(rpo.metrics["nll"]) - nll) < 1e-5
    assert abs(float(rpo.loss_sum - plain.loss_sum) - 0.5 * nll) < 1e-5
    assert build_objective("dpo", {"rpo_alpha": 0.0}).compute(model, batch).loss_sum.item() == \
        pytest.approx(plain.loss_sum.item(), abs=1e-6)
