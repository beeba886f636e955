"""A tiny continual recipe: two built-in tasks on the tiny random Llama, a few steps each."""

from __future__ import annotations

import pytest


def tiny_continual(model_dir, out_dir, *, strategy=None, stages=None, method=None, **extra) -> dict:
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"max_length": 96},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "export": {"adapter": True, "merged": False},
    }
    return {
        "name": "cl", "output_dir": str(out_dir), "base": base,
        "stages": stages or [{"builtin": "date_format", "n": 16, "eval_n": 4},
                             {"builtin": "arithmetic", "n": 16, "eval_n": 4}],
        "strategy": strategy or [], **extra,
    }


@pytest.fixture()
def general_files(tmp_path):
    """A small text file (perplexity, GeRe) and a 3-item multiple-choice file."""
    import json

    text = tmp_path / "general.txt"
    text.write_text(" ".join(f"The year {1990 + i} came after {1989 + i} and before {1991 + i}." for i in range(80)))
    mc = tmp_path / "mc.jsonl"
    items = [{"question": {"stem": f"What is {i} + 1?", "choices": [{"label": "A", "text": str(i + 1)},
                                                                     {"label": "B", "text": str(i + 7)}]},
              "answerKey": "A"} for i in range(3)]
    mc.write_text("".join(json.dumps(x) + "\n" for x in items))
    return text, mc
