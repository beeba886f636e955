"""BitDelta's second stage on a written merge: `tunelab merge RECIPE -o OUT --calibration TEXT`.

A `merge_method: bitdelta` merge writes base + alpha_i * sign(Delta_i) with alpha_i = mean |Delta_i| (the first
stage, `compress.bitdelta_compress`). The paper then distils the scales alpha_i against the fine-tuned model on a
small calibration set (`compress.distill_bitdelta_scales`: logits MSE, AdamW, cosine schedule; the reference's
100 steps of 4 rows of 128 tokens by default). `calibrate_bitdelta` does that on the merge's output: it rebuilds
the base and fine-tuned models from the recipe (adapters included, as the merge resolved them), cuts the
calibration text (a .txt file or JSONL with `text`) into rows of `max_length` tokens with the output's
tokenizer, distils, and rewrites the output atomically (same tensors, same sizes: only the scales change) with
the distillation's losses in `tunelab_merge_report.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tunelab.weights import CheckpointReader, CheckpointWriter

from .compress import bitdelta_compressible, distill_bitdelta_scales
from .recipe import Recipe, load_recipe
from .resolve import resolve_recipe
from .run import _Run


def calibration_batches(tokenizer, path: str | os.PathLike[str], *, n_rows: int, max_length: int,
                        batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Rows of `max_length` tokens from the start of a text file (up to n_rows; fewer if the text is short),
    grouped into batches of `batch_size` (input_ids, attention_mask)."""
    from tunelab.evaluate.perplexity import load_text

    text = load_text(path, max_chars=n_rows * max_length * 12)  # ~4 characters per token, with margin
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(n_rows, len(ids) // max_length)
    if n < 1:
        raise ValueError(f"calibration text {path} has fewer than {max_length} tokens")
    rows = torch.tensor(ids[: n * max_length]).view(n, max_length)
    return [{"input_ids": rows[i: i + batch_size], "attention_mask": torch.ones_like(rows[i: i + batch_size])}
            for i in range(0, n, batch_size)]


def _model(config_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config_dir, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected:
        raise ValueError(f"calibrate_bitdelta: tensors the model does not have: {unexpected[:3]}")
    return model


def calibrate_bitdelta(recipe: Recipe | dict[str, Any] | str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       calibration: str | os.PathLike[str], *, steps: int = 100, lr: float = 1e-4,
                       relative_lr: float | None = None, batch_size: int = 4,
                       max_length: int = 128) -> dict[str, Any]:
    """Distil the scales of the BitDelta merge in `output_dir` (written by `run_merge` from `recipe`); rewrite
    it. Returns the report's `distillation` entry (losses, scales before and after)."""
    from transformers import AutoTokenizer

    r = resolve_recipe(load_recipe(recipe))
    if r.merge_method != "bitdelta":
        raise ValueError(f"--calibration distils BitDelta's scales; merge_method is {r.merge_method!r}")
    out = Path(output_dir)
    run = _Run(r)
    try:
        base = run.full_state_dict(None)
        tuned = run.full_state_dict(run.inputs[0])
    finally:
        run.close()
    signs, scales = {}, {}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        delta = tuned[n].float() - b.float()
        if bitdelta_compressible(n, delta):
            signs[n] = torch.where(delta >= 0, 1.0, -1.0)  # sign(0) = +1, as bitdelta_compress packs it
            scales[n] = float(delta.abs().mean())
    teacher = _model(out, tuned)
    student = _model(out, {**tuned, **{n: base[n] for n in signs}})
    batches = calibration_batches(AutoTokenizer.from_pretrained(out), calibration, n_rows=steps * batch_size,
                                  max_length=max_length, batch_size=batch_size)
    distilled, losses = distill_bitdelta_scales(student, teacher, signs, scales, batches, steps=steps, lr=lr,
                                                relative_lr=relative_lr)
    weights = dict(student.named_parameters())
    reader = CheckpointReader(out)
    try:
        names, dtypes = reader.names(), {n: reader.dtype(n) for n in reader.names()}
        kept = {n: reader.get(n) for n in names if n not in signs}
    finally:
        reader.close()
    report_path = out / "tunelab_merge_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    entry = {"steps": steps, "lr": lr, "relative_lr": relative_lr, "batch_size": batch_size, "max_length": max_length,
             "rows": sum(len(b["input_ids"]) for b in batches), "calibration": str(calibration),
             "loss_first": losses[0], "loss_last": losses[-1], "matrices": len(signs),
             "mean_scale_before": sum(scales.values()) / max(len(scales), 1),
             "mean_scale_after": sum(distilled.values()) / max(len(distilled), 1)}
    report["distillation"] = entry
    extra = {"tunelab_merge_report.json": json.dumps(report, indent=2) + "\n"}
    if (out / "tunelab_merge.yaml").is_file():
        extra["tunelab_merge.yaml"] = (out / "tunelab_merge.yaml").read_text()
    with CheckpointWriter(out, copy_from=out, overwrite=True, dtype=r.torch_dtype, extra_files=extra) as writer:
        for n in names:
            t = weights[n].detach() if n in signs else kept[n]
            writer.add(n, t.to(dtypes[n]) if t.is_floating_point() else t)
    return entry
