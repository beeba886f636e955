"""tunelab.assemble: the one path from a recipe to a prepared model, used by the runner, the continual stream,
`tunelab eval/export RUN` and `tunelab methods --count`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny import tiny_recipe_dict
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


@pytest.mark.parametrize("method", [{"name": "corda", "r": 4, "alpha": 4, "calibration_batches": 2},
                                    {"name": "eva", "r": 4, "alpha": 8, "calibration_batches": 2},
                                    {"name": "lora_ga", "r": 4, "alpha": 8, "calibration_batches": 2}],
                         ids=lambda m: m["name"])
def test_eval_and_export_of_a_calibrated_run_rebuild_the_trained_model(method, tiny_model_dir, tmp_path):
    """CorDA / EVA / LoRA-GA initialise from calibration batches (CorDA and LoRA-GA also change the frozen base:
    W - s B0 A0). Restoring such a run must calibrate it as the run did: `tunelab eval RUN` then scores what the
    run scored after training, and `tunelab export RUN` writes what the run exported."""
    from safetensors.torch import load_file

    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", name=method["name"], method=method,
                         train={"max_steps": 2}, eval={"before": False})
    summary = run_recipe(Recipe.model_validate(d))
    run = tmp_path / "runs" / method["name"]

    res = runner.invoke(app, ["eval", str(run), "--n", "8"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=1e-5)

    (run / "export").rename(run / "export-of-the-run")
    res = runner.invoke(app, ["export", str(run)])
    assert res.exit_code == 0, res.output
    old = load_file(str(run / "export-of-the-run" / "merged" / "model.safetensors"))
    new = load_file(str(run / "export" / "merged" / "model.safetensors"))
    assert old.keys() == new.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_methods_count_calibrates_the_methods_that_need_it(tiny_model_dir, tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path / "runs",
                                                 method={"name": "eva", "r": 4, "calibration_batches": 2})))
    res = runner.invoke(app, ["methods", "--count", str(p)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("eva: ") and "trainable of" in res.output


def test_prepare_without_data_refuses_methods_that_need_data(tiny_model):
    from tunelab.assemble import prepare_without_data

    method, model = prepare_without_data(tiny_model, "lora", {"r": 2})
    assert method.capabilities.is_adapter and any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="prepared from training data"):
        prepare_without_data(tiny_model, "corda", {})


@pytest.mark.parametrize("layout", ["packing", "padding_free"])
def test_rows_of_several_examples_are_refused_for_prompt_learning(layout, tiny_model_dir, tmp_path):
    """PEFT puts prompt tuning's virtual tokens in front of each ROW (and drops position_ids): the examples packed
    after a row's first would train without them. The refusal names the field."""
    from tunelab.assemble import build_method_for, build_objective_for, prepare_model
    from tunelab.model import load_model
    from tunelab.recipe import Recipe

    recipe = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, data={layout: True},
                                                    method={"name": "prompt_tuning", "num_virtual_tokens": 4}))
    model = load_model(recipe.model)
    with pytest.raises(ValueError, match=f"data.{layout}: method 'prompt_tuning' inserts virtual tokens"):
        prepare_model(recipe, model, build_method_for(recipe), build_objective_for(recipe), train_data=None, pad_id=0)
    lora = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, data={layout: True}))
    prepare_model(lora, load_model(lora.model), build_method_for(lora), build_objective_for(lora), train_data=None,
                  pad_id=0)  # adapters on the weights take packed rows


def test_packing_and_padding_free_are_one_choice(tiny_model_dir, tmp_path):
    from pydantic import ValidationError

    from tunelab.recipe import Recipe

    with pytest.raises(ValidationError, match="data.packing and data.padding_free"):
        Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, data={"packing": True, "padding_free": True}))
