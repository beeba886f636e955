"""What `tunelab eval` evaluates: run directories, checkpoints, adapters and plain models, loaded as models.

`evaluate_target` runs one of two evaluations on the loaded model, with the same settings (`--base`, `--label`,
`--batch-size`, `--precision`, `--max-new-tokens`, `--n`, `--diagnostics` mean the same in both):
  * without `tasks` / `harness`: the held-out metrics a run computes (tunelab.evaluate.heldout) on the run's eval
    data, or a built-in `task`;
  * with them: the evaluation suite (tunelab.evaluate.suite) and lm-eval harness tasks.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunelab.core.io import atomic_write_json
from tunelab.core.rundir import check_component, write_json
from tunelab.recipe import DatasetSpec, ModelConfig, Recipe, RecipeError, load_recipe


def run_dir_of(target: str) -> Path | None:
    """The run directory a target belongs to: the run dir itself, or the run of a checkpoint directory."""
    path = Path(target)
    if (path / "recipe.yaml").is_file():
        return path
    if (path / "state.json").is_file() and path.parent.name == "checkpoints" and \
            (path.parent.parent / "recipe.yaml").is_file():
        return path.parent.parent
    return None


def _adapter_base(path: Path, config_name: str) -> Recipe:
    """A recipe whose model is the base an adapter directory names (its `base_model_name_or_path`)."""
    base = json.loads((path / config_name).read_text()).get("base_model_name_or_path")
    return Recipe(model=ModelConfig(name_or_path=base or "smollm2-135m-instruct"))


def reward_model_error(target: str, model_class: str, doing: str) -> Exception:
    """The error (a ModelError) of a command that needs a language model, given a reward model (a scalar head)."""
    from tunelab.model import ModelError

    return ModelError(f"{target} is a reward model ({model_class}: one score per sequence, no vocabulary head), so "
                      f"it cannot {doing}. Give a language model (e.g. the export/merged of an SFT or preference "
                      f"run), or score preference pairs with it: `tunelab eval {target} --task date_format_pref` "
                      "(any *_pref task), or the `reward_model` reward of an RL or iterate recipe")


def load_target(target: str, base: bool = False, *, generates: str | None = None) -> tuple[Recipe, Any, Any]:
    """(recipe giving data defaults, model, tokenizer) for a run dir, checkpoint dir, adapter dir (PEFT or
    tunelab's own format), HF dir, hub id or alias. `base`: the base model of a run (its recipe's model) or of an
    adapter, instead of the trained one; a plain model has none (RecipeError). A plain directory holding a
    *ForSequenceClassification checkpoint (an exported reward model) loads with that head. `generates`: what the
    caller will do with the model's language-model head (`chat`, ...): a reward model is refused with
    `reward_model_error` (a plain directory before its weights load)."""
    from tunelab.model import model_head

    if generates is not None:
        plain = Path(target)
        if run_dir_of(target) is None and (plain / "config.json").is_file():
            from tunelab.model import checkpoint_head

            if checkpoint_head(ModelConfig(name_or_path=target)) != "causal_lm":
                archs = json.loads((plain / "config.json").read_text()).get("architectures") or ["?"]
                raise reward_model_error(target, archs[0], generates)
    recipe, model, tok = _load_target(target, base)
    if generates is not None and model_head(model) != "causal_lm":
        raise reward_model_error(target, _class_name(model), generates)
    return recipe, model, tok


def _class_name(model) -> str:
    from tunelab.core.unwrap import unwrap_model, unwrap_peft

    return type(unwrap_peft(unwrap_model(model))).__name__


def _load_target(target: str, base: bool) -> tuple[Recipe, Any, Any]:
    from tunelab.methods._modules import ADAPTER_CONFIG, load_own_adapter
    from tunelab.model import check_model_source, checkpoint_head, load_model, load_tokenizer

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

        from tunelab.methods.lora import no_bnb_dispatch

        recipe = _adapter_base(path, "adapter_config.json")
        model = load_model(recipe.model)
        if not base:
            with no_bnb_dispatch():
                model = PeftModel.from_pretrained(model, str(path))
        return recipe, model, load_tokenizer(recipe.model)
    if (path / ADAPTER_CONFIG).is_file():  # tunelab's own format (BitFit, SSF, LoReFT, ...), on its base
        recipe = _adapter_base(path, ADAPTER_CONFIG)
        model = load_model(recipe.model)
        return recipe, model if base else load_own_adapter(model, path)[1], load_tokenizer(recipe.model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{target} is neither a run directory (recipe.yaml), a checkpoint (state.json), an "
                                "adapter (adapter_config.json) nor a model directory (config.json)")
    if base:
        raise RecipeError(f"--base evaluates the base model of a run or an adapter; {target} is a plain model")
    recipe = Recipe(model=ModelConfig(name_or_path=target))
    check_model_source(recipe.model, what="eval target")
    model = load_model(recipe.model, head=checkpoint_head(recipe.model))  # a reward model keeps its scalar head
    return recipe, model, load_tokenizer(recipe.model)


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _precision(requested: str, device) -> str:
    """Resolve `auto` once for this evaluation and say what was chosen (stderr, like the CLI's other logs)."""
    from tunelab.core.precision import explain_precision

    precision, why = explain_precision(requested, device)
    logging.getLogger("tunelab").info("precision: %s (%s)", precision, why)
    return precision


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

    Without `tasks` / `harness`: held-out loss, perplexity and exact match on the run's eval data (or `task`), `n`
    items; for a run (or checkpoint) directory they are also written to `<run>/eval_<label>.json` when `label` is
    given (a run's own eval_before/after.json are not replaced otherwise).
    With them: the evaluation suite (tunelab.evaluate.suite) over `tasks` (comma-separated specs allowed) and
    lm-eval `harness` tasks, `n` items per task. For a run (or checkpoint) directory the results are also written
    to `<run>/eval_suite_<label>.json`.
    Both: `base` evaluates the base model of a run or adapter; `label` defaults to "after" (the trained model) or,
    with `base`, "before"; `batch_size`, `precision`, `max_new_tokens` default to the run's recipe
    (`eval.batch_size`, `train.precision`, `eval.max_new_tokens`); `diagnostics` (a run, not with `base`): also
    weight diagnostics of the export vs the base (diagnostics.json). `results["failed"]` lists what raised; the CLI
    exits non-zero when it is not empty.
    """
    if label is not None:
        check_component(label, "--label")  # it names eval[_suite]_<label>.json inside the run directory
    run = run_dir_of(target)
    if diagnostics and (run is None or base):
        raise RecipeError("--diagnostics compares a run's trained weights with its base model: give a run or "
                          "checkpoint directory, without --base")
    t0 = time.perf_counter()
    suite_asked = bool(tasks or harness)  # generation, log-likelihoods, perplexity: a language-model head
    recipe, model, tok = load_target(target, base=base, generates="run --tasks / --harness evaluations (they "
                                     "need a language-model head)" if suite_asked else None)
    device = _device()
    model.to(device)
    save_heldout = run is not None and label is not None  # a run's own eval_after.json is not replaced unasked
    label = label or ("before" if base else "after")
    batch_size = batch_size or recipe.eval.batch_size
    precision = _precision(precision or recipe.train.precision, device)  # `auto` resolved once, and said
    max_new_tokens = max_new_tokens or recipe.eval.max_new_tokens
    if not tasks and not harness:
        results = _heldout(target, recipe, model, tok, task=task, n=n, batch_size=batch_size, precision=precision,
                           max_new_tokens=max_new_tokens, device=device, progress=progress)
        results.update({"label": label, "base": base, "failed": [], "eval_time_s": time.perf_counter() - t0})
        name = f"eval_{label}.json" if save_heldout else None
    else:
        from tunelab.evaluate.suite import SuiteSettings, run_suite, suite_record

        specs = [t for item in (tasks or []) for t in item.split(",") if t.strip()]
        harness_tasks = [t for item in (harness or []) for t in item.split(",") if t.strip()]
        settings = SuiteSettings(
            n=n, batch_size=batch_size, precision=precision, max_new_tokens=max_new_tokens, checker=checker,
            harmful=harmful, benign=benign, detector=refusal_detector, safety_max_new_tokens=safety_max_new_tokens,
            ppl_max_chars=ppl_max_chars or None, ppl_max_length=ppl_max_length, ppl_stride=ppl_stride,
            harness_include=harness_include, harness_limit=harness_limit, progress=progress)
        suite = run_suite(model, tok, specs, settings, harness=harness_tasks or None, data_cfg=recipe.data)
        results = suite_record(str(target), label, recipe.model.name_or_path if base or run is None else str(run),
                               base, suite, time.perf_counter() - t0)
        name = f"eval_suite_{label}.json" if run is not None else None
    if diagnostics and run is not None:
        from tunelab.evaluate.diagnostics import diagnose_run

        try:
            results["diagnostics"] = diagnose_run(run)["summary"]
        except Exception as e:  # noqa: BLE001 - recorded like a failed task
            results["diagnostics"] = {"error": f"{type(e).__name__}: {e}"}
            results["failed"].append("diagnostics")
    if name is not None:
        assert run is not None
        results["written_to"] = str(write_json(run, name, results))
    return results


def _heldout(target: str, recipe: Recipe, model, tok, *, task: str | None, n: int, batch_size: int, precision: str,
             max_new_tokens: int, device, progress: bool) -> dict[str, Any]:
    """Held-out metrics (tunelab.evaluate.heldout, as a run computes them) on the run's eval data, or `task`."""
    from tunelab.data.pipeline import encode_spec, eval_items
    from tunelab.evaluate.heldout import HeldOutSettings, heldout_metrics, is_pairs
    from tunelab.model import model_head

    spec = recipe.data.eval or DatasetSpec(builtin="date_format", split="eval")
    if task is not None:
        spec = DatasetSpec(builtin=task, split="eval", n=n)
    spec = spec.model_copy(update={"n": n})
    # held-out data is scored on the responses only: instruction-modelling weights are for training
    data_cfg = recipe.data.model_copy(update={"prompt_loss_weight": None})
    data, _ = encode_spec(tok, spec, data_cfg)
    scalar_head = model_head(model) != "causal_lm"
    if scalar_head and not is_pairs(data) and task is None:
        # no task asked, and the default has no pairs: a reward model (a plain export, read with the quickstart's
        # data) measures only pairs, so it gets the quickstart task's preference pairs
        spec = DatasetSpec(builtin="date_format_pref", split="eval", n=n)
        data, _ = encode_spec(tok, spec, data_cfg)
    if scalar_head and not is_pairs(data):  # a reward model measures nothing else
        raise reward_model_error(target, _class_name(model), f"be evaluated on {spec.builtin or spec.path}: it "
                                 "holds no preference pairs (a reward model reports pairwise accuracy on pairs)")
    items = eval_items(spec, recipe.data) if spec.builtin else []
    settings = HeldOutSettings(batch_size=batch_size, precision=precision, max_new_tokens=max_new_tokens,
                               device=device, progress=progress)
    results: dict[str, Any] = {"target": target, "data": spec.builtin or spec.path,
                                "settings": {"n": n, "batch_size": batch_size, "precision": precision,
                                             "max_new_tokens": max_new_tokens}}
    results.update(heldout_metrics(model, tok, data, items, settings))  # pairs: reference-free metrics
    return results


def show_results(results: dict[str, Any], output: Path | None = None, echo=print) -> int:
    """What `tunelab eval` prints (and writes to `output`); returns the exit code: 1 when a task failed."""
    from tunelab.evaluate.suite import format_results

    if "tasks" in results:
        echo(format_results(results))
    else:
        echo(json.dumps({k: v for k, v in results.items() if k not in ("samples", "written_to")}, indent=2))
    if results.get("written_to"):
        echo(f"results: {results['written_to']}")
    if output:
        atomic_write_json(Path(output), results)
    if results.get("failed"):
        echo(f"failed: {', '.join(results['failed'])}")
        return 1
    return 0
