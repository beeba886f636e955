"""End to end through the CLI on the tiny model: run, resume, export, eval, methods, errors."""

import json
import re

import yaml
from tiny import tiny_recipe_dict
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.methods.registry import list_methods

runner = CliRunner()


def _write_recipe(tmp_path, tiny_model_dir, **sections):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", **sections)))
    return p


def test_run_end_to_end(tiny_model_dir, tmp_path):
    recipe = _write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["run", str(recipe), "train.max_steps=3", "name=e2e"])
    assert res.exit_code == 0, res.output
    assert "exact match" in res.output and "held-out loss" in res.output
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == "lora"
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert {"eval_loss", "exact_match", "perplexity"} <= set(summary["before"]) <= set(summary["after"])
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()
    assert (run / "export" / "merged" / "config.json").is_file()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    # a second run of the same name gets a new directory, never overwrites
    res = runner.invoke(app, ["run", str(recipe), "train.max_steps=1", "name=e2e", "eval.before=false"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "e2e-2" / "summary.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3

    res = runner.invoke(app, ["eval", str(run), "--n", "4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["n"] == 4 and 0.0 <= out["exact_match"] <= 1.0 and out["eval_loss"] > 0

    res = runner.invoke(app, ["eval", str(run / "export" / "adapter"), "--n", "4"])
    assert res.exit_code == 0, res.output

    (run / "export").rename(run / "old-export")
    res = runner.invoke(app, ["export", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_recipe_field_is_named(tiny_model_dir, tmp_path):
    recipe = _write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["run", str(recipe), "train.bogus=1"])
    assert res.exit_code == 2
    assert "recipe field 'train.bogus': unknown field" in res.output


def test_malformed_data_names_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    recipe = _write_recipe(tmp_path, tiny_model_dir, data={"train": {"path": str(data)}})
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2
    assert f"{data}:2: missing field 'completion'" in res.output
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_methods_lists_with_papers():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    assert "lora" in res.output and "arxiv.org/abs/2106.09685" in res.output


def test_methods_name_shows_its_options():
    res = runner.invoke(app, ["methods", "lora"])
    assert res.exit_code == 0, res.output
    assert "rslora: bool = false" in res.output and "alpha/sqrt(r)" in res.output and "r: int = 16" in res.output
    res = runner.invoke(app, ["methods", "no_such_method"])
    assert res.exit_code == 2 and "unknown method 'no_such_method'" in res.output


def test_methods_count(tiny_model_dir, tmp_path):
    # exactly the registered methods (docs/methods.md's 39): a method module that stopped registering fails here
    listed = runner.invoke(app, ["methods"]).output.splitlines()
    assert len(listed) == 39, listed
    assert {line.split()[0] for line in listed} == set(list_methods())
    recipe = _write_recipe(tmp_path, tiny_model_dir, method={"name": "freeze", "layers": [-1]})
    res = runner.invoke(app, ["methods", "--count", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "freeze:" in res.output and "trainable of" in res.output
    # the tiny Llama's last decoder layer: q, o 64x64; k, v 64x32 (2 kv heads of 16); gate, up, down 64x128; two
    # norms of 64 = 36,992 of 106,816 (the 512x64 embedding tied with the head, counted once)
    assert "freeze: 36,992 trainable of 106,816 parameters (34.6315%)" in res.output


# every command's arguments and option names: the CLI's contract with scripts and docs (a renamed or dropped option
# fails here, and a new command must be listed)
COMMANDS = {
    "board": (["runs_dir"], ["--host", "--max-parallel", "--port", "--token"]),
    "continual": (["recipe", "overrides"], ["--fields", "--overwrite", "--resume", "--strategies"]),
    "iterate": (["recipe", "overrides"], ["--overwrite", "--resume"]),
    "eval": (["target"], ["--base", "--batch-size", "--benign", "--checker", "--diagnostics", "--harmful", "--harness",
                          "--harness-include", "--harness-limit", "--label", "--max-new-tokens", "--n", "--output",
                          "--ppl-max-chars", "--ppl-stride", "--ppl-window", "--precision", "--refusal-detector",
                          "--task", "--tasks", "-o"]),
    "chat": (["target"], ["--max-new-tokens", "--seed", "--system", "--temperature", "--top-k", "--top-p"]),
    "export": (["run_dir"], ["--adapter", "--gguf", "--merged", "--no-adapter", "--no-merged", "--quant"]),
    "generate": (["target"], ["--batch-size", "--input", "--max-new-tokens", "--output", "--precision", "--seed",
                              "--temperature", "--top-p", "-i", "-o"]),
    "merge": (["recipe"], ["--calibration", "--calibration-lr", "--calibration-relative-lr", "--calibration-steps",
                           "--output", "--overwrite", "-o"]),
    "methods": (["name"], ["--count", "--markdown"]),
    "objectives": ([], []),
    "recipe": (["show", "overrides"], []),
    "report": (["run_dirs"], ["--diagnostics", "--output", "--screenshot", "--title", "-o"]),
    "rewards": ([], []),
    "run": (["recipe", "overrides"], ["--overwrite", "--resume"]),
    "select": (["data", "overrides"], ["--budget", "--config", "--embedding", "--format", "--list", "--model", "--n",
                                       "--no-progress", "--output", "--progress", "--report-dir", "--scorer",
                                       "--selector", "-o"]),
    "sweep": (["recipe", "overrides"], ["--best", "--name", "--objective", "--output", "--pruner", "--resume",
                                        "--space", "--storage", "--study", "--trial", "--trials", "-o"]),
    "tasks": ([], []),
    "train": (["recipe", "overrides"], ["--overwrite", "--resume"]),
}


def test_every_command_has_help_with_its_options():
    import typer

    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS), "a command was added or removed: list it in COMMANDS"
    for name, cmd in group.commands.items():
        args, options = COMMANDS[name]
        declared = sorted(o for p in cmd.params if p.param_type_name == "option"
                          for o in [*p.opts, *p.secondary_opts])
        assert declared == sorted(options), name
        assert [p.name for p in cmd.params if p.param_type_name == "argument"] == args, name
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})  # rich wraps at the terminal's width
        assert res.exit_code == 0 and "Usage" in res.output, (name, res.output)
        for word in [*args, *options]:  # each argument and option is in the help text the user reads
            assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", res.output), (name, word)
