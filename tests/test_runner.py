"""runner.run_recipe's switches."""

from __future__ import annotations

import json

from tiny import tiny_recipe_dict


def test_run_recipe_without_training_does_not_train(tiny_model_dir, tmp_path):
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", name="untrained", export={"merged": False})
    summary = run_recipe(Recipe.model_validate(d), do_train=False)
    run = tmp_path / "runs" / "untrained"
    assert summary["steps"] == 0 and summary["final_train_loss"] is None and summary["after"] == {}
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert not (run / "eval_after.json").exists() and (run / "eval_before.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 0
    assert summary["trainable_params"] > 0  # prepared all the same
    # the exported adapter is the untrained one: LoRA's B starts at zero
    from safetensors.torch import load_file

    lora_b = [t for k, t in load_file(str(run / "export" / "adapter" / "adapter_model.safetensors")).items()
              if "lora_B" in k]
    assert lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b)


def test_truncated_examples_are_counted_in_the_log_and_summary(tiny_model_dir, tmp_path, capsys):
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    # every other response is longer than max_length: cut, not dropped (the tiny tokenizer: ~3 tokens per "ok ")
    rows = [{"messages": [{"role": "user", "content": "Say it"},
                          {"role": "assistant", "content": "ok " * (30 if i % 2 else 5)}]} for i in range(8)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", name="cut", export={"adapter": False, "merged": False},
                         data={"train": {"path": str(path)}, "eval": None, "max_length": 64},
                         train={"max_steps": 1, "batch_size": 4, "precision": "fp32"})
    summary = run_recipe(Recipe.model_validate(d))
    out = capsys.readouterr().out
    assert "train data: 8 kept, 0 dropped as too long, 4 truncated" in out
    assert "(data.truncation=right, max_length=64)" in out
    saved = json.loads((tmp_path / "runs" / "cut" / "summary.json").read_text())
    assert saved["data"]["train"] == summary["data"]["train"] == {"kept": 8, "dropped_too_long": 0, "truncated": 4,
                                                                  "dropped_no_target": 0}
