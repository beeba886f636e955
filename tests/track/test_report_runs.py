"""End to end on two real tiny runs (LoRA and full fine-tuning): suite before/after, diagnostics, report, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import tiny_recipe_dict


def test_two_runs_evaluated_diagnosed_and_reported(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.evaluate.diagnostics import diagnose_run
    from tunelab.evaluate.targets import evaluate_target
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"question": q, "choices": ["blue", "green"], "answer": a})
                            for q, a in (("Sky?", 0), ("Grass?", 1))) + "\n")
    runs = {}
    for name, method in (("lora", {"name": "lora", "r": 4, "alpha": 8}), ("full", {"name": "full"})):
        recipe = Recipe.model_validate(tiny_recipe_dict(
            tiny_model_dir, tmp_path / "runs", name=name, method=method, train={"max_steps": 2, "lr": 1e-2},
            data={"eval": {"builtin": "date_format", "split": "eval", "n": 2}}, eval={"max_new_tokens": 4}))
        runs[name] = run_recipe(recipe)["run_dir"]
    kw = dict(tasks=[f"mc:{mc}", "safety"], n=1, precision="fp32", safety_max_new_tokens=2, progress=False)
    for run in runs.values():
        before = evaluate_target(run, base=True, **kw)
        after = evaluate_target(run, diagnostics=True, **kw)
        assert before["label"] == "before" and after["label"] == "after" and not after["failed"]
        saved = json.loads((tmp_path / "runs" / run.split("/")[-1] / "eval_suite_after.json").read_text())
        assert saved["tasks"]["safety"]["n_harmful"] == 1
    # the same trained weights reached three ways: run dir, its checkpoint dir, its exported adapter (no merge)
    lora_dir = tmp_path / "runs" / "lora"
    ckpt = sorted((lora_dir / "checkpoints").glob("step-*"))[-1]
    mc_only = {**kw, "tasks": [f"mc:{mc}"]}
    via = {"run": json.loads((lora_dir / "eval_suite_after.json").read_text()),
           "ckpt": evaluate_target(str(ckpt), label="ckpt", **mc_only),
           "adapter": evaluate_target(str(lora_dir / "export" / "adapter"), **mc_only)}
    assert (lora_dir / "eval_suite_ckpt.json").is_file() and "written_to" not in via["adapter"]
    mc_name = f"mc:{tmp_path.name}/mc.jsonl"
    lls = {k: [ll for s in v["tasks"][mc_name]["samples"] for ll in s["loglikelihoods"]] for k, v in via.items()}
    assert lls["ckpt"] == pytest.approx(lls["run"], abs=1e-5) and lls["adapter"] == pytest.approx(lls["run"], abs=1e-4)
    # LoRA r=4: every delta has rank <= 4, so effective rank <= 4; full fine-tuning changes far more directions
    lora = json.loads((tmp_path / "runs" / "lora" / "diagnostics.json").read_text())
    full = json.loads((tmp_path / "runs" / "full" / "diagnostics.json").read_text())
    assert lora["summary"]["changed"] == 14  # 7 targets x 2 layers
    assert all(r["effective_rank"] <= 4 + 1e-6 for r in lora["matrices"] if r["delta_norm"] > 0)
    assert full["summary"]["mean_effective_rank"] > 8
    # the adapter route (base + B A scale, preferred) gives the same deltas as the merged export (fp32 here)
    assert lora["summary"]["tuned"].endswith("adapter")
    shutil.rmtree(tmp_path / "runs" / "lora" / "export" / "adapter")
    via_merged = diagnose_run(tmp_path / "runs" / "lora", write=False)
    assert via_merged["summary"]["tuned"].endswith("merged")
    merged_norms = {r["name"]: r["delta_norm"] for r in via_merged["matrices"]}
    assert via_merged["summary"]["changed"] == 14
    for r in lora["matrices"]:
        assert r["delta_norm"] == pytest.approx(merged_norms[r["name"]], rel=1e-3)
    # the report through the CLI
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", runs["lora"], runs["full"], "-o", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "Weight diagnostics" in page and 'id="diagnostics"' in page
    assert ">lora</td><td>lora</td>" in page and ">full</td><td>full</td>" in page
    assert "mc:" in page and "refusal_rate" in page
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "-o", str(out)])
    assert res.exit_code == 2 and "not a directory" in res.output
