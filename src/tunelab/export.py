"""Exports: the method's adapter (PEFT format for the PEFT methods, tunelab's own format or a sparse delta for the
others: `Method.adapter_format`), a merged full model in HF format (each with the tokenizer), and GGUF files of the
merged model with an Ollama Modelfile (tunelab.export_gguf, tunelab.export_ollama).

The merged model's generation config is checked against the tokenizer's EOS and the chat template's
end-of-turn token, and fixed when the end-of-turn token is missing (tunelab.export_stops).

Both are written to a temporary directory and renamed into place, so a crash never leaves a
half-written export under the final name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.core.io import atomic_dir
from tunelab.export_gguf import write_gguf
from tunelab.export_ollama import TemplateNotTranslatable, write_modelfile
from tunelab.export_stops import fix_generation_config, stop_rate_warning
from tunelab.methods.registry import ExportUnsupported, Method
from tunelab.model import model_head
from tunelab.train.precision import upcast_linears


def export_adapter(method: Method, model, tokenizer, directory: Path) -> Path:
    """`method.save_adapter` (+ tokenizer): PEFT's adapter_config.json + adapter_model.safetensors, or the method's
    own files; ExportUnsupported for methods without an adapter."""
    with atomic_dir(directory) as tmp:
        method.save_adapter(model, str(tmp))
        tokenizer.save_pretrained(tmp)
    return Path(directory)


def export_merged(method: Method, model, tokenizer, directory: Path) -> Path:
    """A plain HF checkpoint with the method folded in; loads with AutoModelForCausalLM.from_pretrained (a reward
    model, `objective: reward`: with AutoModelForSequenceClassification, its scalar head included).

    Adapter methods merge in place (the adapter is gone from `model` afterwards): call this last.
    """
    with atomic_dir(directory) as tmp:
        # frozen weights may be stored in bf16 for training: merge in fp32, save in the config's dtype
        dtype = getattr(model.config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        upcast_linears(model, dtype)
        merged = method.merged_model(model)
        if getattr(merged.config, "quantization_config", None) is not None:
            del merged.config.quantization_config
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model_head(merged) == "causal_lm":  # a reward model (sequence classification) generates nothing
            fix_generation_config(tmp, tokenizer)
    return Path(directory)


def export_run(run_dir: Path, *, adapter: bool = True, merged: bool = True,
               checkpoint: Path | None = None, gguf: list[str] | None = None) -> dict[str, str]:
    """`tunelab export RUN`: the run's latest checkpoint (or `checkpoint`), prepared as the run prepared it
    (`tunelab.assemble.restore_run`), exported into `<run>/export/` under the run directory's lock (a run still
    training there would export into the same place; `gguf`: quantisations of GGUF files written from the merged
    model). Warns when the run's evaluation showed its stop rate falling."""
    import json
    import sys

    from tunelab.assemble import restore_run
    from tunelab.core.rundir import lock_run_dir

    restored = restore_run(run_dir, checkpoint)
    lock = lock_run_dir(run_dir)
    try:
        results = export_all(restored.method, restored.model, restored.tokenizer, Path(run_dir) / "export",
                             adapter=adapter, merged=merged, gguf=gguf)
    finally:
        lock.release()
    evals = [Path(run_dir) / f"eval_{label}.json" for label in ("before", "after")]
    if all(p.is_file() for p in evals):
        warning = stop_rate_warning(*(json.loads(p.read_text()) for p in evals))
        if warning:
            print(warning, file=sys.stderr)
    return results


def export_gguf(model_dir: Path, tokenizer, directory: Path, quants: list[str], log=print) -> dict[str, str]:
    """GGUF files of the merged HF model in `model_dir` (`<directory>/model-<quant>.gguf`), each with an Ollama
    Modelfile (`Modelfile.<quant>`; `Modelfile` is the first quant's). Returns {"gguf_<quant>": path}."""
    results: dict[str, str] = {}
    directory = Path(directory)
    for i, quant in enumerate(quants):
        path = write_gguf(model_dir, directory / f"model-{quant}.gguf", quant=quant, tokenizer=tokenizer)
        results[f"gguf_{quant}"] = str(path)
        try:
            write_modelfile(path, tokenizer, directory / f"Modelfile.{quant}")
            if i == 0:
                write_modelfile(path, tokenizer, directory / "Modelfile")
        except TemplateNotTranslatable as e:
            log(f"  no Ollama Modelfile: {e}")
    return results


def export_all(method: Method, model, tokenizer, out_dir: Path, *, adapter: bool = True, merged: bool = True,
               gguf: list[str] | None = None, log=print) -> dict[str, str]:
    """Run the exports a recipe asks for; returns {kind: path or reason skipped}. `gguf`: quantisations to write
    from the merged model (needs `merged`)."""
    results: dict[str, str] = {}
    out_dir = Path(out_dir)
    if adapter:
        try:
            results["adapter"] = str(export_adapter(method, model, tokenizer, out_dir / "adapter"))
        except ExportUnsupported as e:
            results["adapter"] = f"skipped: {e}"
    if merged:
        try:
            results["merged"] = str(export_merged(method, model, tokenizer, out_dir / "merged"))
        except ExportUnsupported as e:
            results["merged"] = f"skipped: {e}"
    if gguf:
        if not merged or results["merged"].startswith("skipped"):
            results["gguf"] = "skipped: GGUF is written from the merged model"
        elif model_head(model) != "causal_lm":
            results["gguf"] = "skipped: a reward model (sequence classification) has no GGUF form"
        else:
            results.update(export_gguf(out_dir / "merged", tokenizer, out_dir / "gguf", gguf, log=log))
    for kind, where in results.items():
        log(f"  {kind}: {where}")
    return results
