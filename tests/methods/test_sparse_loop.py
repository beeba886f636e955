"""End-to-end through the real runner and loop (accelerate-wrapped optimizer, checkpoints on disk, JSON
method state, exports): a crash and resume reproduces the uninterrupted loss curve bit for bit, and the
exports of the sparse and quantised methods are written."""

import json

import pytest
import torch
from tiny import tiny_recipe_dict

from tunelab.export import export_all
from tunelab.recipe import Recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint


class Crash(Exception):
    pass


def _recipe(model_dir, out, method):
    d = tiny_recipe_dict(model_dir, out, method=method,
                         train={"max_steps": 4, "save_every": 2, "lr": 1e-2, "warmup_ratio": 0.0},
                         data={"train": {"builtin": "date_format", "n": 16}, "eval": None, "max_length": 96},
                         eval={"before": False, "after": False})
    return Recipe.model_validate(d)


@pytest.mark.parametrize("method", [
    {"name": "lisa", "gamma": 1, "switch_every": 2},  # switch at step 2, resume from step 2's checkpoint
    {"name": "galore", "rank": 4, "update_proj_gap": 3},  # projector saved mid-gap, loaded weights_only
    {"name": "mezo", "eps": 1e-3},
    {"name": "lift", "rank": 4, "density": 0.1, "update_interval": 3},  # bool masks in the checkpoint
    {"name": "spiel", "density": 0.05, "reselect_every": 3, "accumulation_steps": 2},  # indices + accumulator
])
def test_crash_and_resume_through_the_runner(tiny_model_dir, tmp_path, method):
    ws = open_workspace(_recipe(tiny_model_dir, tmp_path / "a", method))
    _, full, _ = train_workspace(ws)

    def crash_at_3(step, loss):
        if step == 3:
            raise Crash()

    r = _recipe(tiny_model_dir, tmp_path / "b", method)
    ws2 = open_workspace(r)
    with pytest.raises(Crash):
        train_workspace(ws2, on_step=crash_at_3)
    state = json.loads((latest_checkpoint(ws2.run_dir) / "state.json").read_text())
    if method["name"] == "lisa":
        assert state["method"]["period"] == 1 and len(state["method"]["layers"]) == 1
    ws3 = open_workspace(r, run_dir=ws2.run_dir, resume=True)
    _, resumed, _ = train_workspace(ws3, resume=True)
    curve = [json.loads(x)["loss"] for x in (ws2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert curve == full.losses
    a = load_checkpoint(latest_checkpoint(ws.run_dir))["trainable"]
    b = load_checkpoint(latest_checkpoint(ws2.run_dir))["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exports_of_sparse_and_quantised_methods(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    for method in ({"name": "spiel", "density": 0.05, "reselect_every": 2, "accumulation_steps": 1},
                   {"name": "qlora", "r": 4, "alpha": 8},
                   {"name": "lift", "rank": 4, "density": 0.1, "update_interval": 2}):
        r = _recipe(tiny_model_dir, tmp_path / method["name"], method)
        r.train.max_steps = 2
        ws = open_workspace(r)
        model, result, _ = train_workspace(ws)
        exports = export_all(ws.method, model, ws.tokenizer, ws.run_dir / "export", log=lambda *_: None)
        merged = AutoModelForCausalLM.from_pretrained(exports["merged"])
        assert sum(p.numel() for p in merged.parameters()) > 0
        if method["name"] == "spiel":
            assert (ws.run_dir / "export" / "adapter" / "sparse_delta.safetensors").is_file()
        if method["name"] == "qlora":
            assert (ws.run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()
            assert merged.dtype == torch.bfloat16
        if method["name"] == "lift":
            assert exports["adapter"].startswith("skipped")
