"""Helpers of the continual tests (imported as `from continual_helpers import ...`)."""

from __future__ import annotations


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
