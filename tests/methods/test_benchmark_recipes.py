"""benchmarks/methods.py builds a valid recipe for every registered method (the quickstart recipe with the method's
default options and the benchmark's budget), and its learning-rate table names only registered methods."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tunelab.methods.registry import list_methods

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_methods", BENCH / "methods.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_learning_rates_name_registered_methods(bench):
    assert set(bench.LR) <= set(list_methods())


def test_every_method_gets_a_valid_recipe_with_the_same_budget(bench, tmp_path):
    for name in list_methods():
        r = bench.recipe_for(name, steps=3, batch_size=2, eval_n=4, out_dir=str(tmp_path))
        assert r.method.name == name and r.method_options() == {}
        assert (r.train.max_steps, r.train.batch_size, r.data.train.n, r.eval.n) == (3, 2, 6, 4)
        assert r.train.lr == bench.LR.get(name, bench.DEFAULT_LR)
        assert r.data.train.builtin == "date_format" and r.objective.name == "sft"


def test_failed_rows_keep_the_table(bench):
    rows = [{"name": "lora", "lr": 1e-3, "trainable_pct": 3.5, "exact_match": 1.0, "eval_loss": 0.01,
             "tokens_per_s": 300.0, "step_s": 1.5, "peak_mb": 1600.0, "base_mb": 500.0, "child_cpu_s": 40.0},
            {"name": "broken", "error": "ValueError: no", "child_cpu_s": 3.0}]
    text = bench.text_table(rows)
    assert "broken" in text and "FAILED: ValueError: no" in text and "100%" in text
    md = bench.markdown_table(rows).splitlines()
    assert len(md) == 4 and all(line.count("|") == md[0].count("|") for line in md)


def test_lr_grid_point_gets_its_own_run_and_rate(bench, tmp_path):
    default = bench.recipe_for("lora", steps=3, batch_size=2, eval_n=4, out_dir=str(tmp_path))
    point = bench.recipe_for("lora", steps=3, batch_size=2, eval_n=4, out_dir=str(tmp_path), lr=3e-3)
    assert point.train.lr == 3e-3 and default.train.lr == bench.LR.get("lora", bench.DEFAULT_LR)
    assert point.name != default.name  # grid points never share a run directory


def test_best_of_grid_picks_the_lowest_held_out_loss(bench):
    grid = [{"name": "lora", "lr": 3e-4, "eval_loss": 0.30, "exact_match": 0.5},
            {"name": "lora", "lr": 1e-3, "eval_loss": 0.01, "exact_match": 0.9},
            {"name": "lora", "lr": 3e-3, "error": "Diverged: nan loss"}]
    best = bench.best_of_grid(grid)
    assert best["lr"] == 1e-3 and best["exact_match"] == 0.9
    assert [g["lr"] for g in best["lr_grid"]] == [3e-4, 1e-3, 3e-3] and "error" in best["lr_grid"][2]
    tie = [{**grid[1], "exact_match": 0.5}, {**grid[1], "lr": 2e-3}]
    assert bench.best_of_grid(tie)["lr"] == 2e-3  # equal loss: the higher exact match
    failed = bench.best_of_grid([grid[2], {**grid[2], "lr": 1e-2}])
    assert failed["error"] and len(failed["lr_grid"]) == 2
