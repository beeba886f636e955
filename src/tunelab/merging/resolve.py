"""What a model reference in a merge recipe points to.

A reference is one of

* an HF checkpoint directory (``config.json`` + safetensors) - used as it is;
* a PEFT LoRA adapter directory (``adapter_config.json``) - used as it is (materialised as a delta
  against its base by :mod:`tunelab.merging.run`);
* a tunelab run directory (``recipe.yaml`` + ``export/``) - replaced by ``<run>/export/merged``
  (a full checkpoint, self-contained) or, for the LoRA-level methods, ``<run>/export/adapter``;
  the other one is the fallback when the preferred export is missing;
* a tunelab built-in model alias (``smollm2-135m-instruct``) - its cached HF conversion;
* a hub id already in the local HF cache (resolved later by :func:`tunelab.weights.resolve_model_path`).

:func:`resolve_recipe` rewrites every reference of a recipe this way, so the recipe saved with the
output names the directories that were actually read.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.weights import ADAPTER_CONFIG, SAFE_INDEX, SAFE_SINGLE

from .recipe import LORA_METHODS, Recipe

__all__ = ["is_run_dir", "resolve_ref", "resolve_recipe"]


def _is_checkpoint(p: Path) -> bool:
    return (p / "config.json").is_file() and ((p / SAFE_SINGLE).is_file() or (p / SAFE_INDEX).is_file())


def _is_adapter(p: Path) -> bool:
    return (p / ADAPTER_CONFIG).is_file()


def is_run_dir(path: str | Path) -> bool:
    """A tunelab run directory: has the saved ``recipe.yaml`` and is not itself a model or adapter."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "recipe.yaml").is_file() and not _is_checkpoint(p) and not _is_adapter(p)


def resolve_ref(ref: str, *, prefer_adapter: bool = False) -> str:
    """The directory to read for ``ref`` (see the module doc); other references are returned unchanged."""
    p = Path(ref).expanduser()
    if is_run_dir(p):
        export = p / "export"
        found = {"merged": export / "merged", "adapter": export / "adapter"}
        valid = {"merged": _is_checkpoint(found["merged"]), "adapter": _is_adapter(found["adapter"])}
        order = ["adapter", "merged"] if prefer_adapter else ["merged", "adapter"]
        for kind in order:
            if valid[kind]:
                if prefer_adapter and kind != "adapter":
                    raise ValueError(
                        f"{p} is a tunelab run without an adapter export ({found['adapter']}); LoRA-level merging "
                        "needs PEFT LoRA adapters (was it trained with a LoRA method?)"
                    )
                return str(found[kind].resolve())
        raise ValueError(
            f"{p} is a tunelab run directory without an export ({found['merged']} or {found['adapter']}); "
            f"write one with `tunelab export {p}`"
        )
    if not p.exists():
        from tunelab.model import BUILTIN_MODELS

        if ref in BUILTIN_MODELS:
            from tunelab.model import resolve_model_path
            from tunelab.recipe import ModelConfig

            return resolve_model_path(ModelConfig(name_or_path=ref))[0]
    return ref


def resolve_recipe(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` whose ``base_model``, ``models[*].model`` and ``parameters.source_base`` are
    resolved with :func:`resolve_ref` (models to adapters for the LoRA-level methods)."""
    lora = recipe.merge_method in LORA_METHODS
    models = [e.model_copy(update={"model": resolve_ref(e.model, prefer_adapter=lora)}) for e in recipe.models]
    params = recipe.parameters
    if params.source_base:
        params = params.model_copy(update={"source_base": resolve_ref(params.source_base)})
    base = resolve_ref(recipe.base_model) if recipe.base_model else None
    return recipe.model_copy(update={"base_model": base, "models": models, "parameters": params})
