"""A quickstart-like run (tiny model, LoRA on the date task) exported with `export.gguf`: the GGUF loads in
transformers with the merged model's logits on the held-out prompts; stop rate before/after in the table."""

import json

import pytest
import torch
import yaml
from tiny import tiny_recipe_dict
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def gguf_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-run")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp / "runs", export={"gguf": ["f16", "q8_0"]})))
    res = runner.invoke(app, ["run", str(recipe), "name=g"])
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "g", res.output


def test_run_writes_gguf_and_modelfile(gguf_run):
    run, output = gguf_run
    gguf_dir = run / "export" / "gguf"
    assert {p.name for p in gguf_dir.iterdir()} == {"model-f16.gguf", "model-q8_0.gguf", "Modelfile",
                                                    "Modelfile.f16", "Modelfile.q8_0"}
    assert "FROM ./model-f16.gguf" in (gguf_dir / "Modelfile").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exports"]["gguf_q8_0"].endswith("model-q8_0.gguf")
    assert "stop rate" in output
    assert 0.0 <= summary["before"]["stop_rate"] <= 1.0 and 0.0 <= summary["after"]["stop_rate"] <= 1.0


def test_gguf_logits_equal_the_merged_model_on_held_out_prompts(gguf_run):
    from tunelab.data.encode import encode_prompt
    from tunelab.data.pipeline import eval_items
    from tunelab.recipe import load_recipe

    run, _ = gguf_run
    recipe = load_recipe(run / "recipe.yaml")
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
    gguf = AutoModelForCausalLM.from_pretrained(run / "export" / "gguf", gguf_file="model-f16.gguf",
                                                dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "export" / "merged")
    items = eval_items(recipe.data.eval, recipe.data)[:8]
    for it in items:
        ids = torch.tensor([encode_prompt(tok, it.messages)])
        with torch.no_grad():
            want, got = merged(input_ids=ids).logits, gguf(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-3)  # f16 weights
        assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())


def test_export_command_gguf_and_generation_config(gguf_run, tmp_path):
    from transformers import GenerationConfig

    run, _ = gguf_run
    res = runner.invoke(app, ["export", str(run), "--no-adapter", "--quant", "q4_0"])
    assert res.exit_code == 0, res.output
    assert (run / "export" / "gguf" / "model-q4_0.gguf").is_file()
    eos = GenerationConfig.from_pretrained(run / "export" / "merged").eos_token_id
    assert 2 in ([eos] if isinstance(eos, int) else eos)  # the template's <|im_end|>
    res = runner.invoke(app, ["export", str(run), "--quant", "q3_k"])
    assert res.exit_code != 0 and "q3_k" in res.output


def test_gguf_needs_merged_is_named(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path / "runs",
                                                      export={"gguf": ["f16"], "merged": False})))
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code != 0 and "export.merged" in res.output
