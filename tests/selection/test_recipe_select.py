"""`data.select:` in a training recipe: selection runs before training, in the run directory."""

import json

import pytest
from tiny import tiny_recipe_dict

from tunelab.recipe import Recipe, RecipeError
from tunelab.validate import load_validated_recipe


def test_recipe_selects_before_training(tiny_model_dir, tmp_path):
    from tunelab.runner import open_workspace, train_workspace

    select = {"scorer": {"name": "perplexity", "precision": "fp32"}, "selector": {"name": "topk"}, "budget": "50%",
              "dedup": {"near": True}}
    r = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, train={"max_steps": 2},
                                               data={"train": {"builtin": "date_format", "n": 16}, "select": select}))
    ws = open_workspace(r)
    sel = ws.run_dir / "select"
    rows = [json.loads(line) for line in (sel / "subset.jsonl").read_text().splitlines()]
    assert len(rows) == 8 == len(ws.train_data)
    assert all("perplexity" in row["select_scores"] for row in rows)
    report = json.loads((sel / "report.json").read_text())
    assert report["read"] == 16 and report["selected"] == 8
    ppl = report["scores"]["perplexity"]
    assert ppl["subset"]["mean"] <= ppl["pool"]["mean"]  # lower perplexity preferred
    indices = json.loads((sel / "indices.json").read_text())
    # resuming reuses the saved subset (no re-selection)
    (sel / "report.json").unlink()
    ws2 = open_workspace(r, run_dir=ws.run_dir, resume=True)
    assert not (sel / "report.json").exists() and len(ws2.train_data) == 8
    assert json.loads((sel / "indices.json").read_text()) == indices
    _, result, _ = train_workspace(ws)
    assert result.steps == 2


def test_recipe_select_options_are_validated(tmp_path):
    with pytest.raises(RecipeError, match="data.select"):
        load_validated_recipe(None, ["data.select.selector.name=kcenter"])  # needs an embedding
    with pytest.raises(RecipeError, match="scorer.bogus: unknown field"):
        load_validated_recipe(None, ["data.select.scorer.name=ifd_loss", "data.select.scorer.bogus=1"])
    r = load_validated_recipe(None, ["data.select.budget=0.05", "data.select.scorer.name=ifd_loss"])
    assert r.data.select.budget == "5%" and r.data.select.scorer.name == "ifd_loss"
