"""The Recipe: one YAML file that says what to fine-tune, on what, how, and what to report.

A recipe is validated by pydantic (unknown keys are rejected, with the dotted path of the field
named in the error), can be overridden from the command line with ``a.b.c=value`` pairs, and is
saved resolved (defaults filled in) into the run directory so every run can be reproduced.

Method and objective options are open dictionaries here (``method: {name: lora, r: 16}``) and are
validated by the registered method's / objective's own ``Config`` class (`tunelab.validate`, above the
registries: this package is schema only and imports nothing of tunelab but itself), so adding a method never
touches this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.recipe.select import SelectConfig


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Where the base model comes from."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="HF hub id, local HF directory, path to a .gguf file, or a built-in alias.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name_or_path` (a dir or hub repo).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the master weights. Compute runs in `train.precision`."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub. Off by default.")
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's (a ChatML fallback is used if it has none)."
    )


class DatasetSpec(_Strict):
    """One dataset: a built-in task generator, a local file, or a hub dataset name."""

    builtin: str | None = Field(None, description="Name of a built-in task (see `tunelab tasks`).")
    path: str | None = Field(None, description="A .jsonl/.json/.parquet/.csv file, or a hub dataset name.")
    split: str = Field("train", description="Split name for hub datasets; for built-in tasks `train` or `eval`.")
    n: int | None = Field(None, ge=1, description="Number of examples (built-in: generated; files: first n).")
    seed: int = Field(0, description="Generator seed for built-in tasks.")
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text", "preference"] = Field(
        "auto", description="Record format; `auto` detects it from the keys of the first record."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of `builtin` or `path`")
        return self


class DataConfig(_Strict):
    """How records become token ids and loss masks."""

    train: DatasetSpec = Field(default_factory=lambda: DatasetSpec(builtin="date_format", n=2000))
    eval: DatasetSpec | None = Field(
        default_factory=lambda: DatasetSpec(builtin="date_format", split="eval", n=100),
        description="Held-out data for eval loss and (for built-in tasks) exact match. null to skip.",
    )
    max_length: int = Field(256, ge=8, description="Maximum tokens per example after the chat template.")
    truncation: Literal["drop", "right", "left", "error"] = Field(
        "drop",
        description="Over-long examples: drop (counted and logged), cut the end, cut the start, or stop with an error.",
    )
    loss_mask: Literal["completion", "assistant", "full"] = Field(
        "completion",
        description="Which tokens carry loss: the last assistant turn, every assistant turn, or everything.",
    )
    prompt_loss_weight: float | None = Field(
        None, gt=0, description="Instruction modelling: the prompt messages' tokens carry loss too, with this weight "
                                "(response tokens: 1). null = loss on the `loss_mask` tokens only. Training data only.")
    system_prompt: str | None = Field(None, description="System message added to every chat example.")
    packing: bool = Field(
        False, description="Pack each micro-batch's examples into rows (no cross-example attention; same loss "
                           "as padding, less wasted compute). Set train.batch_size to examples per micro-batch.")
    pack_length: int = Field(512, ge=8, description="Row length of packed batches (at least the longest example).")
    select: SelectConfig | None = Field(
        None, description="Score, deduplicate and select a subset of `train` before training: scorer, embedding, "
                          "selector, budget, dedup, cache_dir, seed (docs/selection.md). null = train on all of it.")


class MethodConfig(BaseModel):
    """`name` picks a registered method; the other keys are validated by that method's Config."""

    model_config = ConfigDict(extra="allow")
    name: str = "lora"


class ObjectiveConfig(BaseModel):
    """`name` picks a registered objective; the other keys are validated by that objective's Config."""

    model_config = ConfigDict(extra="allow")
    name: str = "sft"


class TrainConfig(_Strict):
    """The training loop."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    optimizer: str = Field("adamw", description="Optimizer name (see tunelab.train.optim.OPTIMIZERS).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only; not biases or norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent in linear warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Autocast dtype for compute.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward: less memory, ~30% more compute.")
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Storage dtype of frozen Linear weights; auto = the autocast dtype (no per-step casts).")
    frozen_cast: Literal["linears", "all"] = Field(
        "all", description="Which frozen weights `frozen_dtype` applies to: `all` (embeddings and norms too: the "
        "residual stream runs in the compute dtype, as when a model is loaded in bf16; faster and smaller, results "
        "within bf16 rounding) or `linears` (the same numerics as fp32 weights under autocast).")
    attention: Literal["auto", "tunelab", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel: `auto` = tunelab's CPU attention on CPU (bf16 matmuls, fp32 softmax), "
        "sdpa elsewhere.")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional). Pays on long runs: compiling takes ~30 s on "
        "2 CPU cores. Falls back to eager when the compiler is unavailable.")
    seed: int = Field(0, description="Seed of weights init (adapters), data order and dropout.")
    log_every: int = Field(1, ge=1, description="Steps between metric lines in metrics.jsonl.")
    eval_every: int | None = Field(None, ge=1, description="Steps between held-out loss evaluations.")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (one is always saved at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep on disk.")


class DistributedConfig(_Strict):
    """How training is spread over processes (launched by torchrun or accelerate launch)."""

    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="`ddp`: every process holds the whole model, gradients are averaged (one process: no "
        "wrapper). `fsdp` (FSDP2) and `deepspeed` (ZeRO) are not available yet: they come with the scale-out work.")


class EvalConfig(_Strict):
    """Evaluation before and after training."""

    before: bool = Field(True, description="Evaluate the base model before training.")
    after: bool = Field(True, description="Evaluate the trained model.")
    exact_match: bool = Field(True, description="Generation-based exact match (built-in tasks only).")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per answer.")
    batch_size: int = Field(32, ge=1, description="Batch size of evaluation (loss and generation).")
    n: int | None = Field(None, ge=1, description="Evaluate on the first n held-out examples only.")
    suite: list[str] = Field(
        default_factory=list, description="Evaluation-suite tasks run before and after training, as `tunelab eval "
        "--tasks` takes them (a built-in task, `gen:FILE`, `mc:FILE`, `ppl:FILE`, `safety`); results in "
        "eval_suite_<before|after>.json, shown by `tunelab report` (task / general ability / safety change).")
    suite_n: int = Field(100, ge=1, description="Items per suite task (generation, multiple choice, safety prompts).")


class ExportConfig(_Strict):
    """What to write after training (under `<run>/export/`)."""

    adapter: bool = Field(True, description="Save the method's adapter: PEFT format for the PEFT methods, tunelab's "
                                            "own format or a sparse delta for the others (docs/methods.md); none for "
                                            "methods that train the model's own weights.")
    merged: bool = Field(True, description="Save a merged full model in HF format.")
    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "q4_0"]] = Field(
        default_factory=list, description="Also write the merged model as GGUF files for llama.cpp / Ollama / LM "
        "Studio, one per quantisation listed (e.g. [f16, q8_0]), with an Ollama Modelfile; needs `merged`. See "
        "docs/export.md.")

    @model_validator(mode="after")
    def _gguf_needs_merged(self) -> ExportConfig:
        if self.gguf and not self.merged:
            raise ValueError("export.gguf is written from the merged model: set export.merged: true")
        return self


class TrackingConfig(_Strict):
    """Experiment trackers, besides metrics.jsonl."""

    tensorboard: bool = Field(False, description="Also log metrics to TensorBoard (needs `tensorboard`).")
    wandb: bool = Field(False, description="Also log to Weights & Biases in offline mode under <run>/wandb "
                                           "(needs `wandb`; `wandb sync` uploads).")
    mlflow: bool = Field(False, description="Also log to an MLflow file store at <run>/mlruns (needs `mlflow-skinny`).")


class Recipe(_Strict):
    """A whole fine-tuning run."""

    name: str = Field("run", description="Run name; the run directory is `<output_dir>/<name>`.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.model_dump().items() if k != "name"}

    def objective_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.objective.model_dump().items() if k != "name"}


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `recipe field 'train.lr': Input should be a valid number (got 'abc')`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]))
        got = f" (got {e['input']!r})" if e["type"] not in ("missing", "extra_forbidden") else ""
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"recipe field '{path}': {msg}{got}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). The value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form a.b.c=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has an empty field name")
    value = yaml.safe_load(raw) if raw != "" else ""
    # YAML 1.1 reads "1e-4" as a string; accept scientific notation as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") and value[:1] not in "'\"" else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: field '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate its shape.

Method, objective and selection options are checked against their registries one layer up
(`tunelab.validate.load_validated_recipe`), which is what commands call."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e)) from None
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every field of the recipe, sections expanded."""
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = info.annotation
        if ann in (MethodConfig, ObjectiveConfig):
            shown = "`tunelab methods NAME` shows them, docs/methods.md lists them" if name == "method" else \
                f"docs/{name}s.md lists them"
            rows.append((f"{path}.name", ann().name, f"registered {name} (`tunelab {name}s`); its options sit "
                                                     f"beside `name`: {shown}"))
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((path, "", ((ann.__doc__ or "").strip().splitlines() or [""])[0]))
            rows += describe_fields(ann, path + ".")
            continue
        if ann is not None and getattr(ann, "__args__", None) and DatasetSpec in ann.__args__:
            rows.append((path, "see below" if info.default is None else "", info.description or ""))
            rows += describe_fields(DatasetSpec, path + ".")
            continue
        if info.default_factory is not None:
            default = info.default_factory()
            default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        else:
            default = info.default
        desc = info.description or ""
        rows.append((path, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
                     .removesuffix("..."), desc))
    return rows


def fields_markdown() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for path, default, desc in describe_fields():
        d = f"`{default}`" if default not in ("", None) else ""
        lines.append(f"| `{path}` | {d} | {desc} |")
    return "\n".join(lines) + "\n"
