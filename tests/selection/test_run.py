"""Selection end to end without a model (length scorer): files, formats, errors with line numbers, budgets,
cache, the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.formats import load_records
from tunelab.recipe.select import SelectConfig
from tunelab.selection.context import ScoringContext
from tunelab.selection.registry import SelectionError
from tunelab.selection.run import SCORE_FIELD, select_file, select_records

runner = CliRunner()


def alpaca(i, out_words):
    return {"instruction": f"Question {i}?", "input": "", "output": " ".join(["word"] * out_words) + f" {i}",
            "id": i}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def length_cfg(**kw):
    return SelectConfig(scorer={"name": "length", "unit": "words"}, **kw)


def test_topk_by_length_keeps_format_and_adds_scores(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, w) for i, w in enumerate([3, 9, 1, 7, 5, 9])])
    result, paths = select_file(str(data), length_cfg(budget=3), tmp_path / "out" / "sub.jsonl", ctx=ScoringContext())
    rows = [json.loads(line) for line in (tmp_path / "out" / "sub.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 3, 5]  # file order; ties (9 words) broken by position
    assert all({"instruction", "input", "output"} <= set(r) for r in rows)
    assert rows[0][SCORE_FIELD] == {"length": 10.0}
    assert result.indices == [1, 3, 5]
    report = json.loads((tmp_path / "out" / "sub.select" / "report.json").read_text())
    assert report["read"] == 6 and report["selected"] == 3 and report["budget_examples"] == 3
    assert report["scores"]["length"]["subset"]["mean"] > report["scores"]["length"]["pool"]["mean"]
    assert "mean_pairwise_jaccard_distance" in report["diversity"]["subset"]
    assert (tmp_path / "out" / "sub.select" / "report.png").is_file()
    assert json.loads((tmp_path / "out" / "sub.select" / "indices.json").read_text()) == [1, 3, 5]
    assert not list((tmp_path / "out").glob("*.tmp-*"))  # written through a temp file + rename


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_other_output_formats_read_back(tmp_path, suffix):
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, i + 1) for i in range(5)])
    out = tmp_path / f"sub{suffix}"
    select_file(str(data), length_cfg(budget=2), out, ctx=ScoringContext())
    back = load_records(str(out))
    assert [r.data["id"] for r in back] == [3, 4]
    assert back[0].data["output"].endswith(" 3")


def test_percent_budget_and_dedup_counts(tmp_path):
    rows = [alpaca(i, i % 4 + 1) for i in range(20)] + [alpaca(0, 1), alpaca(1, 2)]  # two exact copies
    result = select_records(load_records(str(write_jsonl(tmp_path / "d.jsonl", rows))), length_cfg(budget="10%"),
                            ScoringContext())
    assert len(result.records) == 2  # 10% of the 22 read, rounded
    assert result.report["exact_duplicates"] == 2 and result.report["scored"] == 20


def test_bad_records_are_all_reported_with_line_numbers(tmp_path):
    rows = [alpaca(0, 2), {"instruction": "no output"}, alpaca(2, 2), {"instruction": None, "output": "y"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SelectionError) as e:
        select_records(load_records(str(data)), length_cfg(budget=1), ScoringContext())
    msg = str(e.value)
    assert ("2 record(s)" in msg and f"{data}:2: missing field 'output'" in msg
            and f"{data}:4: missing field 'instruction'" in msg)


def test_records_a_scorer_cannot_use_are_reported_with_line_numbers(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "assistant", "content": "a lone answer"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "dangling"}]}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = SelectConfig(scorer={"name": "ifd_ppl"}, budget=1)  # IFD needs an instruction before the response
    with pytest.raises(SelectionError) as e:
        select_records(load_records(str(data)), cfg, ScoringContext())
    msg = str(e.value)
    assert f"{data}:2: scorer 'ifd_ppl': no user turn" in msg
    assert f"{data}:3: scorer 'ifd_ppl': the last message must be the assistant's response" in msg
    assert f"{data}:1" not in msg


def test_budget_errors(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, 2) for i in range(5)])
    records = load_records(str(data))
    with pytest.raises(SelectionError, match="larger than the pool: 5 candidates"):
        select_records(records, length_cfg(budget=6), ScoringContext())
    with pytest.raises(SelectionError, match="selects nothing"):
        select_records(records, length_cfg(budget=0), ScoringContext())
    with pytest.raises(ValueError, match="budget"):
        length_cfg(budget="lots")


def test_cache_hit_keyed_by_data_model_and_config(tmp_path, monkeypatch):
    from tunelab.selection.scorers.length import Length

    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, i + 1) for i in range(6)])
    records = load_records(str(data))
    calls = []
    real = Length.score

    def counting(self, examples, ctx):
        calls.append(len(examples))
        return real(self, examples, ctx)

    monkeypatch.setattr(Length, "score", counting)
    cache = tmp_path / "cache"
    first = select_records(records, length_cfg(budget=2), ScoringContext(), cache_dir=cache)
    second = select_records(records, length_cfg(budget=2), ScoringContext(), cache_dir=cache)
    assert calls == [6] and first.indices == second.indices  # second run: from the cache
    assert second.report["scoring"]["length"] == {"cached": True}
    select_records(records, SelectConfig(scorer={"name": "length", "unit": "chars"}, budget=2), ScoringContext(),
                   cache_dir=cache)  # other scorer config
    select_records(records[:5], length_cfg(budget=2), ScoringContext(), cache_dir=cache)  # other data
    assert calls == [6, 6, 5]
    assert len(list(cache.glob("*.npz"))) == 3


def test_cache_key_includes_the_model(tiny_model_dir, tmp_path):
    from tunelab.recipe import ModelConfig
    from tunelab.selection.cache import cache_key
    from tunelab.selection.registry import build_scorer

    scorer = build_scorer("perplexity", {})
    a = scorer.identity(ScoringContext(model=ModelConfig(name_or_path=str(tiny_model_dir))))
    b = scorer.identity(ScoringContext(model=ModelConfig(name_or_path=str(tmp_path))))
    assert a != b and cache_key("d", "perplexity", {}, a) != cache_key("d", "perplexity", {}, b)
    proxy = build_scorer("perplexity", {"model": str(tmp_path)}).identity(ScoringContext())
    assert proxy == b  # a proxy model given to the scorer is what its scores depend on


def test_cli_select(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, i + 1) for i in range(10)])
    out = tmp_path / "sub.jsonl"
    res = runner.invoke(app, ["select", str(data), "scorer.unit=words", "--scorer", "length", "--budget", "20%",
                              "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "selected 2" in res.output and "subset:" in res.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [8, 9]
    res = runner.invoke(app, ["select", str(data), "--scorer", "length", "--budget", "11", "-o", str(out)])
    assert res.exit_code == 2 and "larger than the pool" in res.output
    res = runner.invoke(app, ["select", str(data), "--scorer", "length", "--budget", "0", "-o", str(out)])
    assert res.exit_code == 2 and "selects nothing" in res.output
    res = runner.invoke(app, ["select", str(data), "--scorer", "nope", "-o", str(out)])
    assert res.exit_code == 2 and "unknown scorer 'nope'" in res.output
    res = runner.invoke(app, ["select", "--list"])
    assert res.exit_code == 0 and "ifd_ppl" in res.output and "arxiv.org/abs/2402.00530" in res.output


def test_cli_random_selection_with_a_config_file(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, 2) for i in range(10)])
    cfg = tmp_path / "sel.yaml"
    cfg.write_text("scorer: null\nselector: {name: random}\nbudget: 3\nseed: 4\n")
    out = tmp_path / "sub.jsonl"
    res = runner.invoke(app, ["select", str(data), "--config", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and SCORE_FIELD not in rows[0]
    picked = np.random.default_rng(4).choice(10, 3, replace=False)
    assert sorted(r["id"] for r in rows) == sorted(picked.tolist())


def test_cli_diversity_selector_without_embedding_gets_the_default_one(tmp_path, tiny_model_dir, monkeypatch):
    """`--selector kcenter` alone runs (it used to answer with recipe syntax): the default embedding is MiniLM when
    installed, else the tuned model's own hidden state (`lm`, forced here to keep the test small)."""
    import importlib.util

    import tunelab.selection.scorers.embedding as emb

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == emb.MINILM_PACKAGE else real_find_spec(name, *a))
    assert emb.default_encoder() == "lm"
    data = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, i % 4 + 1) for i in range(12)])
    out = tmp_path / "sub.jsonl"
    res = runner.invoke(app, ["select", str(data), "--selector", "kcenter", "--scorer", "none", "--budget", "4",
                              "--model", str(tiny_model_dir), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "embedding: lm (the default for a diversity selector" in res.output
    assert len(out.read_text().splitlines()) == 4
    report = json.loads((tmp_path / "sub.select" / "report.json").read_text())
    assert report["embedding"]["encoder"] == "lm"
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert emb.default_encoder() == ("minilm" if real_find_spec(emb.MINILM_PACKAGE) else "lm")
