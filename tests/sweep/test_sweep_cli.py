"""`tunelab sweep` and `tunelab board` through the CLI: refusals by name, --best on a finished sweep, the shipped
sweep recipe validating, and (slow) a real two-trial sweep on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_recipe_dict
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.commands._common import builtin_recipe_path
from tunelab.sweep.spec import load_sweep, parse_sweep
from tunelab.sweep.study import run_sweep

runner = CliRunner()
FAKE = [sys.executable, str(Path(__file__).with_name("fake_run.py"))]


def test_shipped_sweep_recipe_validates():
    sr = load_sweep(builtin_recipe_path("sweep_quickstart"))
    assert len(sr.parsed_objectives()) == 3 and sr.trials == 12
    assert set(sr.parsed_space().conditional["method"]) == {"lora", "dora", "pissa", "loraplus", "ia3"}


def test_refusals_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "b", "output_dir": str(tmp_path)}))
    res = runner.invoke(app, ["sweep", str(recipe), "--objective", "eval.exact_match:max"])
    assert res.exit_code == 2 and "an ordinary recipe needs --space" in res.output
    space = tmp_path / "s.yaml"
    space.write_text("train.lrr: {low: 1.0e-4, high: 1.0e-3}\n")
    res = runner.invoke(app, ["sweep", str(recipe), "--space", str(space), "--objective", "eval.exact_match:max"])
    assert res.exit_code == 2 and "sweep space 'train.lrr': not a recipe field" in res.output
    res = runner.invoke(app, ["sweep", str(tmp_path), "--best"])
    assert res.exit_code == 2 and "not a sweep directory" in res.output
    res = runner.invoke(app, ["board", str(tmp_path), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "give --token" in res.output
    res = runner.invoke(app, ["board", str(tmp_path), "--host", "0.0.0.0", "--token", "short"])
    assert res.exit_code == 2 and "at least 16 characters" in res.output


def test_best_from_the_cli(tmp_path):
    s = {"name": "sw", "output_dir": str(tmp_path), "base": {"name": "b", "model": {"name_or_path": "m"},
                                                            "train": {"max_steps": 2, "lr": 0.01}},
         "space": {"train.lr": {"choices": [0.01, 0.04]}, "method": {"lora": {"r": {"choices": [2, 8]}}}},
         "objectives": ["eval.exact_match:max", "train.peak_memory_mb:min"], "trials": 3}
    summary = run_sweep(parse_sweep(s), launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    res = runner.invoke(app, ["sweep", str(tmp_path / "sw"), "--best", "-o", str(tmp_path / "best.yaml")])
    assert res.exit_code == 0, res.output
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    front = {t["number"] for t in summary["best"]}
    number = int(res.output.split()[1])
    assert number in front and best["name"] == "sw-best"
    res = runner.invoke(app, ["sweep", str(tmp_path / "sw")])
    assert res.exit_code == 2 and "--resume continues it" in res.output


@pytest.mark.slow
def test_real_sweep_on_the_tiny_model(tiny_model_dir, tmp_path):
    base = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs")
    base["train"]["max_steps"] = 2
    base["export"] = {"adapter": False, "merged": False}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-sweep", "output_dir": str(tmp_path), "base": base,
                                    "space": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                                              "method": {"lora": {"r": {"choices": [2, 4]}}, "ia3": {}}},
                                    "objectives": ["eval.eval_loss:min", "train.peak_memory_mb:min"], "trials": 2}))
    res = runner.invoke(app, ["sweep", str(path)])
    assert res.exit_code == 0, res.output
    assert "Pareto front:" in res.output
    summary = json.loads((tmp_path / "tiny-sweep" / "summary.json").read_text())
    assert summary["trials"]["complete"] == 2
    for t in summary["all"]:  # real runs: their own summary, metrics and memory
        run = Path(t["run_dir"])
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
        assert t["values"]["train.peak_memory_mb:min"] > 0
    res = runner.invoke(app, ["sweep", str(tmp_path / "tiny-sweep"), "--best"])
    assert res.exit_code == 0, res.output
    from tunelab.validate import load_validated_recipe

    assert load_validated_recipe(tmp_path / "tiny-sweep" / "best_recipe.yaml").name == "tiny-sweep-best"
