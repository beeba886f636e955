"""The continual recipe (validation with field paths, overrides) and the `tunelab continual` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from continual_helpers import tiny_continual
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.continual.recipe import fields_markdown, load_continual_recipe, parse_continual_recipe
from tunelab.recipe import RecipeError


def _write(tmp_path, d) -> Path:
    p = tmp_path / "cl.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_errors_name_the_field(tmp_path):
    d = tiny_continual("m", tmp_path)
    d["stages"][1]["bulitin"] = "acronym"
    with pytest.raises(RecipeError, match=r"recipe field 'stages.1.bulitin': unknown field"):
        parse_continual_recipe(d)
    d = tiny_continual("m", tmp_path, method={"name": "lora", "rank": 4})
    with pytest.raises(RecipeError, match=r"recipe field 'base.method.rank': unknown field"):
        parse_continual_recipe(d)
    d = tiny_continual("m", tmp_path, strategy={"name": "ewc", "wieght": 1})
    with pytest.raises(RecipeError, match=r"recipe field 'strategy.0.wieght': unknown field"):
        parse_continual_recipe(d)
    with pytest.raises(RecipeError, match=r"strategy.0.name': unknown strategy 'ewk'"):
        parse_continual_recipe(tiny_continual("m", tmp_path, strategy="ewk"))
    with pytest.raises(RecipeError, match="stage names must be unique"):
        parse_continual_recipe(tiny_continual("m", tmp_path, stages=[{"builtin": "acronym"}, {"builtin": "acronym"}]))
    with pytest.raises(RecipeError, match="a user task needs `eval` data"):
        parse_continual_recipe(tiny_continual("m", tmp_path, stages=[{"train": {"path": "x.jsonl"}}]))
    with pytest.raises(RecipeError, match=r"'stages': List should have at least 1 item"):
        parse_continual_recipe({**tiny_continual("m", tmp_path), "stages": []})


def test_overrides_reach_list_items_and_stage_recipes(tmp_path):
    d = tiny_continual("m", tmp_path, strategy={"name": "replay"})  # a single mapping is a list of one
    cr = load_continual_recipe(_write(tmp_path, d), ["stages.1.n=5", "strategy.ratio=0.5", "base.train.lr=0.5",
                                                     "stages.0.max_steps=7"])
    assert cr.stages[1].n == 5 and cr.strategy[0].options()["ratio"] == 0.5
    r0, r1 = cr.stage_recipe(0), cr.stage_recipe(1)
    assert r0.train.max_steps == 7 and r1.train.max_steps == 3 and r1.train.lr == 0.5
    assert r1.data.train.builtin == "arithmetic" and r1.data.eval.split == "eval" and r1.data.eval.n == 4
    cr = load_continual_recipe(_write(tmp_path, d), ["strategy.0.ratio=0.25"])
    assert cr.strategy[0].options()["ratio"] == 0.25


def test_shipped_recipe_and_docs_are_current():
    from tunelab.commands._common import builtin_recipe_path

    cr = load_continual_recipe(builtin_recipe_path("continual_lora"))
    assert cr.task_names == ["date_format", "arithmetic", "sort_numbers"]
    doc = (Path(__file__).parents[2] / "docs" / "continual.md").read_text()
    assert fields_markdown() in doc, "docs/continual.md is stale: regenerate it from `tunelab continual --fields`"
    from tunelab.continual.strategies import list_strategies

    for name, cls in list_strategies().items():  # every strategy documented with its paper
        assert f"`{name}`" in doc and cls.paper in doc, name


def test_cli_runs_resumes_and_reports(tiny_model_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["continual", "--strategies"])
    assert res.exit_code == 0 and "olora" in res.output and "arxiv.org/abs/2310.14152" in res.output
    res = runner.invoke(app, ["continual", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "continual recipe not found" in res.output
    path = _write(tmp_path, tiny_continual(tiny_model_dir, tmp_path / "runs"))
    res = runner.invoke(app, ["continual", str(path), "base.train.max_steps=2", "strategy=l2"])
    assert res.exit_code == 0, res.output
    assert "R matrix" in res.output and "after 02 arithmetic" in res.output and "BWT" in res.output
    run = tmp_path / "runs" / "cl"
    assert json.loads((run / "continual" / "state.json").read_text())["completed"] == 2
    res = runner.invoke(app, ["continual", str(run)])  # a finished run directory: nothing is trained again
    assert res.exit_code == 0 and "stage 1/2" not in res.output
    res = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "Continual learning: R matrices" in page and "forgetting_max = " in page


def test_continuing_a_run_directory_takes_its_lock(tmp_path):
    """`tunelab continual RUN [--resume]` is refused while another process holds the run (as `tunelab run RUN
    --resume` is), before any model work: the model named here does not even exist."""
    import os
    import subprocess
    import sys
    import textwrap

    run = tmp_path / "runs" / "cl"
    run.mkdir(parents=True)
    (run / "continual.yaml").write_text(yaml.safe_dump(tiny_continual(tmp_path / "no-model", tmp_path / "runs")))
    holder = textwrap.dedent("""
        import sys, time
        from tunelab.core.rundir import lock_run_dir
        lock_run_dir(sys.argv[1])
        print("locked", flush=True)
        time.sleep(120)
    """)
    src = str(Path(__file__).parents[2] / "src")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": src})
    try:
        assert proc.stdout.readline().strip() == "locked"
        for args in (["continual", str(run)], ["continual", str(run), "--resume"]):
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output
            assert f"error: run directory {run.resolve()} is in use by pid {proc.pid}" in res.output
    finally:
        proc.kill()
        proc.wait()
