"""What `tunelab eval` evaluates: run directories, checkpoints, adapters and plain models, loaded as models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.recipe import DatasetSpec, Recipe, load_recipe


def run_dir_of(target: str) -> Path | None:
    """The run directory a target belongs to: the run dir itself, or the run of a checkpoint directory."""
    path = Path(target)
    if (path / "recipe.yaml").is_file():
        return path
    if (path / "state.json").is_file() and path.parent.name == "checkpoints" and \
            (path.parent.parent / "recipe.yaml").is_file():
        return path.parent.parent
    return None


def _load_target(target: str, base: bool = False) -> tuple[Recipe, Any, Any]:
    """(recipe giving data defaults, model, tokenizer) for a run dir, checkpoint dir, adapter dir (PEFT or
    tunelab's own format), HF dir, hub id or alias. `base`: the base model of a run (its recipe's model) instead of the trained one."""
    import json

    from tunelab.model import load_model, load_tokenizer
    from tunelab.recipe import ModelConfig

    path = Path(target)
    run = run_dir_of(target)
    if run is not None and base:
        recipe = load_recipe(run / "recipe.yaml")
        return recipe, load_model(recipe.model), load_tokenizer(recipe.model)
    if run is not None:  # prepared as the run prepared it (calibration included), with the checkpoint's weights
        from tunelab.assemble import restore_run

        restored = restore_run(run, None if run == path else path)
        return restored.recipe, restored.model, restored.tokenizer
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        recipe = Recipe(model=ModelConfig(name_or_path=base or "smollm2-135m-instruct"))
        model = PeftModel.from_pretrained(load_model(recipe.model), str(path))
        return recipe, model, load_tokenizer(recipe.model)
    from tunelab.methods._modules import ADAPTER_CONFIG, load_own_adapter

    if (path / ADAPTER_CONFIG).is_file():  # tunelab's own format (BitFit, SSF, LoReFT, ...), on its base
        base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        recipe = Recipe(model=ModelConfig(name_or_path=base or "smollm2-135m-instruct"))
        _, model = load_own_adapter(load_model(recipe.model), path)
        return recipe, model, load_tokenizer(recipe.model)
    recipe = Recipe(model=ModelConfig(name_or_path=target))
    return recipe, load_model(recipe.model), load_tokenizer(recipe.model)


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def evaluate_target(target: str, *, task: str | None = None, n: int = 100, tasks: list[str] | None = None,
                    harness: list[str] | None = None, harness_include: str | None = None,
                    harness_limit: int | None = None, base: bool = False, label: str | None = None,
                    batch_size: int | None = None, precision: str | None = None, max_new_tokens: int | None = None,
                    checker: str = "exact", harmful: str | None = None, benign: str | None = None,
                    refusal_detector: str | None = None, safety_max_new_tokens: int = 48,
                    ppl_max_chars: int | None = 100_000,
                    ppl_max_length: int | None = None, ppl_stride: int | None = None, diagnostics: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Evaluate a model, adapter, checkpoint or run.

    Without `tasks` / `harness`: held-out loss, perplexity and exact match on the run's eval data (or `task`).
    With them: the evaluation suite (tunelab.evaluate.suite) over `tasks` (comma-separated specs allowed) and
    lm-eval `harness` tasks. For a run (or checkpoint) directory the results are also written to
    `<run>/eval_suite_<label>.json`, label "after" (the trained model) or, with `base`, "before" (the run's
    base model). `results["failed"]` lists the tasks that raised; the CLI exits non-zero when it is not empty.
    `diagnostics` (run directories): also weight diagnostics of the export vs the base (diagnostics.json).
    """
    if not tasks and not harness:
        return _heldout_eval(target, task=task, n=n)
    import time

    from tunelab.evaluate.suite import SuiteSettings, run_suite, suite_record

    t0 = time.perf_counter()
    recipe, model, tok = _load_target(target, base=base)
    device = _device()
    model.to(device)
    specs = [t for item in (tasks or []) for t in item.split(",") if t.strip()]
    harness_tasks = [t for item in (harness or []) for t in item.split(",") if t.strip()]
    settings = SuiteSettings(
        n=n, batch_size=batch_size or recipe.eval.batch_size, precision=precision or recipe.train.precision,
        max_new_tokens=max_new_tokens or recipe.eval.max_new_tokens, checker=checker, harmful=harmful, benign=benign,
        detector=refusal_detector, safety_max_new_tokens=safety_max_new_tokens,
        ppl_max_chars=ppl_max_chars or None, ppl_max_length=ppl_max_length, ppl_stride=ppl_stride,
        harness_include=harness_include, harness_limit=harness_limit, progress=progress)
    suite = run_suite(model, tok, specs, settings, harness=harness_tasks or None, data_cfg=recipe.data)
    run = run_dir_of(target)
    label = label or ("before" if base else "after")
    results = suite_record(str(target), label, recipe.model.name_or_path if base or run is None else str(run), base,
                           suite, time.perf_counter() - t0)
    if diagnostics and run is not None and not base:
        from tunelab.evaluate.diagnostics import diagnose_run

        try:
            results["diagnostics"] = diagnose_run(run)["summary"]
        except Exception as e:  # noqa: BLE001 - recorded like a failed task
            results["diagnostics"] = {"error": f"{type(e).__name__}: {e}"}
            results["failed"].append("diagnostics")
    if run is not None:
        from tunelab.track.run import write_json

        results["written_to"] = str(write_json(run, f"eval_suite_{label}.json", results))
    return results


def show_results(results: dict[str, Any], output: Path | None = None, echo=print) -> int:
    """What `tunelab eval` prints (and writes to `output`); returns the exit code: 1 when a task failed."""
    from tunelab.evaluate.suite import format_results
    from tunelab.train.checkpoint import atomic_write_json

    if "tasks" in results:
        echo(format_results(results))
        if results.get("written_to"):
            echo(f"results: {results['written_to']}")
    else:
        import json

        echo(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2))
    if output:
        atomic_write_json(Path(output), results)
    if results.get("failed"):
        echo(f"failed: {', '.join(results['failed'])}")
        return 1
    return 0


def _heldout_eval(target: str, *, task: str | None = None, n: int = 100) -> dict[str, Any]:
    """Held-out metrics (tunelab.evaluate.heldout, as a run computes them) on the run's eval data, or `task`."""
    from tunelab.data.pipeline import encode_spec, eval_items
    from tunelab.evaluate.heldout import HeldOutSettings, heldout_metrics

    recipe, model, tok = _load_target(target)
    device = _device()
    model.to(device)
    spec = recipe.data.eval or DatasetSpec(builtin="date_format", split="eval")
    if task is not None:
        spec = DatasetSpec(builtin=task, split="eval", n=n)
    spec = spec.model_copy(update={"n": n})
    # held-out data is scored on the responses only: instruction-modelling weights are for training
    data, _ = encode_spec(tok, spec, recipe.data.model_copy(update={"prompt_loss_weight": None}))
    items = eval_items(spec, recipe.data) if spec.builtin else []
    settings = HeldOutSettings(batch_size=recipe.eval.batch_size, precision=recipe.train.precision,
                               max_new_tokens=recipe.eval.max_new_tokens, device=device)
    results: dict[str, Any] = {"target": target, "data": spec.builtin or spec.path}
    results.update(heldout_metrics(model, tok, data, items, settings))  # pairs: reference-free metrics
    return results
