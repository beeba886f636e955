"""The suite: every task runs on its own; failures are recorded with file and line, the rest still scored."""

from __future__ import annotations

import json

import pytest

from tunelab.data.formats import DataError
from tunelab.evaluate.suite import SuiteSettings, parse_spec, run_suite
from tunelab.evaluate.targets import evaluate_target, show_results


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_parse_spec_kinds_and_guessing(tmp_path):
    mc = write(tmp_path / "arc.jsonl", [{"question": {"stem": "q", "choices": []}, "answerKey": "A"}])
    gen = write(tmp_path / "g.jsonl", [{"prompt": "p", "reference": "r"}])
    txt = tmp_path / "wiki.raw"
    txt.write_text("text")
    assert parse_spec("date_format") == ("date_format", "builtin", "date_format")
    assert parse_spec("safety") == ("safety", "safety", None)
    assert parse_spec(f"mc:{mc}")[:2] == (f"mc:{tmp_path.name}/arc.jsonl", "mc")
    assert parse_spec(mc)[1] == "mc" and parse_spec(gen)[1] == "gen" and parse_spec(str(txt))[1] == "ppl"
    assert parse_spec("harness:arc_easy") == ("harness:arc_easy", "harness", "arc_easy")
    with pytest.raises(DataError, match="unknown eval task 'nope'"):
        parse_spec("nope")


def test_failing_tasks_are_recorded_and_the_others_still_run(tmp_path, tiny_model_dir):
    good_mc = write(tmp_path / "mc.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0},
                                            {"question": "Grass?", "choices": ["blue", "green"], "answer": 1}])
    bad_mc = write(tmp_path / "bad_mc.jsonl", [{"question": "ok?", "choices": ["a", "b"], "answer": 0},
                                               '{"question": "broken", "choices": ["a", "b"]'])
    gen = write(tmp_path / "gen.jsonl", [{"prompt": "2+2?", "reference": "4", "checker": "numeric"}])
    text = tmp_path / "wiki.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 3)
    specs = [f"mc:{good_mc}", f"mc:{bad_mc}", f"gen:{gen}", f"ppl:{text}", f"mc:{tmp_path / 'missing.jsonl'}",
             "date_format,not_a_task"]
    res = evaluate_target(str(tiny_model_dir), tasks=specs, n=2, batch_size=4, precision="fp32", max_new_tokens=4,
                          ppl_max_length=16, progress=False)
    t = res["tasks"]
    assert res["failed"] == [f"mc:{tmp_path.name}/bad_mc.jsonl", f"mc:{tmp_path.name}/missing.jsonl", "not_a_task"]
    assert "bad_mc.jsonl:2: malformed JSON" in t[f"mc:{tmp_path.name}/bad_mc.jsonl"]["error"]
    assert "missing.jsonl" in t[f"mc:{tmp_path.name}/missing.jsonl"]["error"]
    ok = t[f"mc:{tmp_path.name}/mc.jsonl"]
    assert ok["n"] == 2 and 0 <= ok["acc"] <= 1 and ok["category"] == "general" and ok["primary"] == "acc_norm"
    assert t[f"gen:{tmp_path.name}/gen.jsonl"]["n"] == 1 and t["date_format"]["n"] == 2
    assert t["date_format"]["category"] == "task" and 0 <= t["date_format"]["score"] <= 1
    ppl = t[f"ppl:{tmp_path.name}/wiki.txt"]
    assert ppl["bits_per_byte"] > 0 and ppl["max_length"] == 16 and ppl["higher_is_better"] is False
    # the CLI helper prints the table and exits non-zero because some tasks failed
    lines = []
    out = tmp_path / "res.json"
    assert show_results(res, out, echo=lines.append) == 1
    assert "failed: " in lines[-1] and json.loads(out.read_text())["failed"] == res["failed"]


def test_all_good_suite_exits_zero(tiny_model, tiny_tokenizer, tmp_path):
    gen = write(tmp_path / "gen.jsonl", [{"prompt": "Say x", "reference": ".*", "checker": "regex"}])
    res = run_suite(tiny_model, tiny_tokenizer, [f"gen:{gen}"],
                    SuiteSettings(n=1, max_new_tokens=2, precision="fp32", progress=False))
    assert res["failed"] == [] and res["tasks"][f"gen:{tmp_path.name}/gen.jsonl"]["score"] == 1.0
    assert show_results(res, echo=lambda s: None) == 0


def test_run_recipe_evaluates_the_suite_before_and_after_and_the_report_shows_it(tmp_path, tiny_model_dir):
    from tiny import tiny_recipe_dict

    from tunelab.recipe import Recipe
    from tunelab.runner import format_table, run_recipe
    from tunelab.track.report import load_run, main_row

    text = tmp_path / "wiki.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 3)
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", eval={"suite": [f"ppl:{text}", "not_a_task"],
                                                                   "suite_n": 2, "n": 2, "max_new_tokens": 4},
                         export={"merged": False})
    summary = run_recipe(Recipe.model_validate(d))
    run = tmp_path / "runs" / d["name"]
    name = f"ppl:{tmp_path.name}/wiki.txt"
    for label in ("before", "after"):
        suite = json.loads((run / f"eval_suite_{label}.json").read_text())
        assert suite["label"] == label and suite["failed"] == ["not_a_task"]  # a failing task costs only itself
        assert suite["tasks"][name]["bits_per_byte"] > 0
        assert summary[label]["suite"][name] == suite["tasks"][name]["bits_per_byte"]
    # training on dates changes the model: bits per byte on this text move
    assert summary["before"]["suite"][name] != summary["after"]["suite"][name]
    assert name in format_table(summary["before"], summary["after"])
    general = main_row(load_run(run))["general"]
    assert [r["task"] for r in general] == [name]


def test_own_format_adapter_is_evaluated_on_its_base(tmp_path, tiny_model_dir):
    import torch

    from tunelab.evaluate.targets import load_target
    from tunelab.methods.registry import build_method
    from tunelab.model import load_model
    from tunelab.recipe import ModelConfig

    method = build_method("ssf", {})
    model = method.prepare(load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.1 * torch.randn_like(p))  # a "trained" SSF: scales and shifts away from identity
    method.save_adapter(model, str(tmp_path / "adapter"))
    _, loaded, _ = load_target(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        plain = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"))(input_ids=ids).logits
    assert not torch.allclose(plain, loaded(input_ids=ids).logits)  # the adapter really is applied
