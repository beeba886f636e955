"""Golden loss curve of a tiny quickstart (as torchtune's recipe tests do): an accidental change of numerics
(loss normalisation, masking, data order, initialisation, schedule, the engine's levers) fails loudly here.

The run: the tiny random Llama of tests/tiny.py (seed 0) + LoRA r=4, the built-in `date_format` task (64
examples), 10 steps of 4 examples, lr 1e-2 with 10% warm-up and cosine decay, fp32, seed 0, through the runner
(`open_workspace` -> `train_workspace`: what `tunelab run` trains). Its per-step training losses must equal
GOLDEN within rtol = atol = 1e-4 (torchtune's tolerance). Measured: 1 and 2 threads give the same values to 7
decimals; a 1% change of the learning rate moves step 8 by 2.6e-4 relative, so the bound catches it.

A change that is MEANT to change the numbers updates GOLDEN, with the reason in the commit: print the new
values with `python tests/train/test_golden_loss.py` (PYTHONPATH=src).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny.py), also when run as a script
from tiny import tiny_recipe_dict  # noqa: E402

GOLDEN = [6.2208134, 6.1547999, 5.9611263, 5.9038911, 5.8877355, 5.9013782, 5.8938929, 5.7940273, 5.8550644,
          5.8240691]
TRAIN = {"max_steps": 10, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.1, "scheduler": "cosine",
         "precision": "fp32", "seed": 0}


def quickstart_losses(model_dir: Path, out_dir: Path) -> list[float]:
    from tunelab.recipe import Recipe
    from tunelab.runner import open_workspace, train_workspace

    recipe = Recipe.model_validate(tiny_recipe_dict(model_dir, out_dir, name="golden", train=TRAIN,
                                                    eval={"before": False, "after": False}))
    _, result, _ = train_workspace(open_workspace(recipe))
    return result.losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="the golden values are the CPU's fp32 numbers")
def test_tiny_quickstart_loss_curve_is_golden(tiny_model_dir, tmp_path):
    losses = quickstart_losses(tiny_model_dir, tmp_path / "runs")
    assert len(losses) == len(GOLDEN)
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(GOLDEN, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4, msg=lambda m: f"loss curve changed: {losses}\n{m}")
    assert losses[-1] < losses[0] - 0.3  # and it is a training curve, not a constant


if __name__ == "__main__":  # print the current curve, to update GOLDEN after an intended change
    import tempfile

    from tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-llama"
        tok = build_tiny_tokenizer()
        build_tiny_model(len(tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        print(json.dumps([round(x, 7) for x in quickstart_losses(model_dir, Path(tmp) / "runs")]))
