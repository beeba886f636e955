"""`tunelab eval TARGET` without --tasks (the held-out evaluation a run computes) honours the options it shares
with --tasks, or refuses them by name: nothing the user typed is silently ignored."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_recipe_dict
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA run trained enough to move its held-out loss away from the base model's."""
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    out = tmp_path_factory.mktemp("runs")
    d = tiny_recipe_dict(tiny_model_dir, out, name="trained", train={"max_steps": 4, "lr": 3e-2},
                         eval={"before": False, "after": False}, export={"merged": False})
    return run_recipe(Recipe.model_validate(d))["run_dir"]


def heldout(*args: str) -> dict:
    res = runner.invoke(app, ["eval", *args])
    assert res.exit_code == 0, res.output
    text = res.output[res.output.index("{"):]
    return json.loads(text[: text.rindex("}") + 1])


def test_base_scores_the_base_model(trained_run, tiny_model_dir):
    same = ["--n", "4", "--batch-size", "4", "--precision", "fp32"]  # the plain model has no recipe to default to
    trained = heldout(trained_run, *same)
    base = heldout(trained_run, *same, "--base")
    plain = heldout(str(tiny_model_dir), *same)
    assert base["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    assert abs(base["eval_loss"] - trained["eval_loss"]) > 1e-3  # --base is not the trained model
    assert (trained["label"], base["label"]) == ("after", "before") and base["base"] is True


def test_precision_and_batch_size_are_used(trained_run):
    fp32 = heldout(trained_run, "--n", "4", "--batch-size", "3")
    bf16 = heldout(trained_run, "--n", "4", "--precision", "bf16")
    assert fp32["settings"] == {"n": 4, "batch_size": 3, "precision": "fp32", "max_new_tokens": 8}
    assert bf16["settings"]["precision"] == "bf16" and bf16["settings"]["batch_size"] == 8  # the recipe's
    assert fp32["eval_loss"] != bf16["eval_loss"]  # bf16 autocast rounds differently: it really ran in bf16
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=2e-2)


def test_max_new_tokens_bounds_the_generations(trained_run, tmp_path):
    preds = {}
    for budget in ("1", "8"):
        out = tmp_path / f"{budget}.json"
        heldout(trained_run, "--n", "4", "--max-new-tokens", budget, "-o", str(out))
        preds[budget] = [s["prediction"] for s in json.loads(out.read_text())["samples"]]
    # greedy decoding: one token is a prefix of eight, and shorter at least once
    assert all(long.startswith(short) for short, long in zip(preds["1"], preds["8"]))
    assert sum(map(len, preds["1"])) < sum(map(len, preds["8"]))


def test_label_saves_the_results_in_the_run(trained_run):
    from pathlib import Path

    res = runner.invoke(app, ["eval", trained_run, "--n", "4", "--label", "probe"])
    assert res.exit_code == 0, res.output
    saved = json.loads((Path(trained_run) / "eval_probe.json").read_text())
    assert saved["label"] == "probe" and saved["eval_loss"] > 0 and "exact_match" in saved
    assert f"results: {Path(trained_run) / 'eval_probe.json'}" in res.output
    heldout(trained_run, "--n", "4")  # without --label nothing is written over the run's own files
    assert not (Path(trained_run) / "eval_after.json").exists()


def test_diagnostics_are_computed_for_a_run(trained_run):
    from pathlib import Path

    out = heldout(trained_run, "--n", "2", "--diagnostics")
    assert out["diagnostics"]["changed"] > 0 and not out["failed"]
    assert (Path(trained_run) / "diagnostics.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--diagnostics"], "--diagnostics compares a run's trained weights with its base model"),
    (["--base"], "is a plain model"),
    (["--checker", "numeric", "--ppl-window", "64"], "--checker, --ppl-window only apply to --tasks / --harness"),
])
def test_what_does_not_apply_is_refused_by_name(tiny_model_dir, args, message):
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--n", "2", *args], terminal_width=200)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_task_with_tasks_is_refused(tiny_model_dir):
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--task", "arithmetic", "--tasks", "date_format"])
    assert res.exit_code == 2 and "--tasks arithmetic" in res.output
