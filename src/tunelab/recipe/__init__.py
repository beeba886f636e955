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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.core.io import NotUtf8, read_utf8
from tunelab.core.rundir import check_component
from tunelab.recipe.iterate import IterateConfig
from tunelab.recipe.rewards import RewardSpec
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
        "right",
        description="Over-long examples: cut the end (keeps the prompt's start and as much of the response as fits; "
                    "counted and logged), drop them (counted), cut the start, or stop with an error. Preference pairs "
                    "follow it too, each of chosen and rejected cut on its own (TRL's DPO `truncation_mode`).",
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
    padding_free: bool = Field(
        False, description="Each micro-batch's examples as one row of exactly their tokens (TRL's `padding_free`): no "
                           "padding and no cross-example attention; the same examples per step and the same loss "
                           "as padding.")
    select: SelectConfig | None = Field(
        None, description="Score, deduplicate and select a subset of `train` before training: scorer, embedding, "
                          "selector, budget, dedup, cache_dir, seed (docs/selection.md). null = train on all of it.")

    @model_validator(mode="after")
    def _one_layout(self) -> "DataConfig":
        if self.packing and self.padding_free:
            raise ValueError("data.packing and data.padding_free both lay examples out in rows: choose one")
        return self


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
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype for compute. `auto` is resolved once when a run starts and printed with "
        "its reason (`precision: fp32 (auto: this CPU has no native bf16: avx2)`): bf16 where the device computes it "
        "natively (CUDA sm_80+; CPUs with avx512_bf16 or AMX; AArch64 bf16), fp32 on other CPUs (bf16 is emulated "
        "there, ~60x slower than fp32), fp16 with loss scaling (accelerate's GradScaler) on GPUs without bf16. "
        "recipe.yaml keeps `auto`; summary.json records the choice.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward: less memory, ~30% more compute. Under "
        "`train.compile` the compiler does the recomputing inside each compiled layer (AOTAutograd's activation "
        "memory budget 0), instead of transformers' checkpoint wrapper, which would break the compiled graph.")
    activation_memory_budget: float = Field(
        1.0, ge=0, le=1, description="Under `train.compile`: the fraction of each compiled layer's activations kept "
        "for backward (AOTAutograd's activation memory budget); the rest is recomputed in backward, the cheapest "
        "operations first. 1 keeps everything (fastest), 0 recomputes all but the layer's inputs (as "
        "`gradient_checkpointing`, which sets it to 0). With `attention: sdpa`, 0.1 is the memory setting: LIMA at "
        "512 tokens, peak RSS 3.4 -> 1.7-1.9 GB at the same steady speed, but 15-35% slower steps on short rows "
        "(docs/engine.md). Without compile it does nothing.")
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Storage dtype of frozen Linear weights; auto = the autocast dtype (no per-step casts).")
    frozen_cast: Literal["linears", "all"] = Field(
        "all", description="Which frozen weights `frozen_dtype` applies to: `all` (embeddings and norms too: the "
        "residual stream runs in the compute dtype, as when a model is loaded in bf16; faster and smaller, results "
        "within bf16 rounding) or `linears` (the same numerics as fp32 weights under autocast).")
    attention: Literal["auto", "tunelab", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel: `auto` = tunelab's CPU attention on CPU under bf16 (bf16 matmuls, fp32 "
        "softmax), sdpa elsewhere (and under fp32).")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer (regional) for the training steps. `auto` = on when "
        "training SFT-family objectives on CPU with the DDP backend (where it was measured: 1.5-2x the tokens/s), off "
        "for preference and RL objectives (not measured), for BOFT (its compilation costs ~30x LoRA's), on GPUs and "
        "under FSDP / DeepSpeed. Compiled code is cached on disk ($TUNELAB_CACHE/inductor), so only a machine's first "
        "run pays the full compilation (~30 s on 2 CPU cores); any compiler failure falls back to eager with a "
        "warning.")
    seed: int = Field(0, description="Seed of weights init (adapters), data order and dropout.")
    log_every: int = Field(1, ge=1, description="Steps between metric lines in metrics.jsonl.")
    eval_every: int | None = Field(None, ge=1, description="Steps between held-out loss evaluations.")
    save_every: int | None = Field(
        None, ge=1, description="Steps between checkpoints (one is always saved at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep on disk.")


class FSDPConfig(_Strict):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) options, used when `distributed.backend` is `fsdp`."""

    reshard_after_forward: bool = Field(
        True, description="Free each decoder layer's gathered weights after its forward and gather them again in "
        "backward (ZeRO-3: least memory). false keeps them until backward (ZeRO-2-like: one all-gather less per "
        "layer).")
    cpu_offload: bool = Field(
        False, description="Keep the sharded parameters, gradients and optimizer state in CPU memory and run the "
        "optimizer there (FSDP2 CPUOffloadPolicy); only the layer being computed lives on the GPU.")
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="MixedPrecisionPolicy: dtype the weights are gathered and computed in (null: as stored; "
        "`train.precision` autocast still applies).")
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="MixedPrecisionPolicy: dtype gradients are reduce-scattered in (null: `param_dtype`'s).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward (applied per layer before "
        "sharding, parameter names unchanged). Use it instead of `train.gradient_checkpointing`, not with it.")


class DeepSpeedConfig(_Strict):
    """DeepSpeed ZeRO options, used when `distributed.backend` is `deepspeed` (the `tunelab[deepspeed]` extra)."""

    zero_stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters.")
    offload_optimizer_device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where ZeRO keeps (and steps) the optimizer state: `cpu` is ZeRO-Offload.")
    offload_param_device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where ZeRO-3 keeps the parameters between uses (`cpu`, `nvme`: ZeRO-Infinity).")
    config: str | dict[str, Any] | None = Field(
        None, description="A DeepSpeed JSON config (a file path or an inline mapping) merged over the one tunelab "
        "writes from the fields above and `train.*`: anything else DeepSpeed takes. Batch sizes, accumulation and "
        "clipping come from `train.*` (a different value here is an error); so do the optimizer and schedule.")


class DistributedConfig(_Strict):
    """How training is spread over processes (launched by torchrun or accelerate launch; docs/distributed.md)."""

    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="`ddp`: every process holds the whole model, gradients are averaged (one process: no "
        "wrapper). `fsdp`: FSDP2, parameters, gradients and optimizer state sharded per decoder layer, sharded "
        "checkpoints (DCP) that resume on any number of processes. `deepspeed`: ZeRO stage `deepspeed.zero_stage`.")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


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
    merged: bool = Field(True, description="Save a merged full model in HF format (`objective: reward`: a "
                                           "sequence-classification checkpoint, the `reward_model` reward's path).")
    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "q4_0"]] = Field(
        default_factory=list, description="Also write the merged model as GGUF files for llama.cpp / Ollama / LM "
        "Studio, one per quantisation listed (e.g. [f16, q8_0]), with an Ollama Modelfile; needs `merged`; none for a "
        "reward model. See docs/export.md.")

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


class RolloutConfig(_Strict):
    """On-line RL: sample completions of the training prompts with the current policy between optimizer steps
    (docs/rl.md). Set together with an RL objective (grpo, gspo, rloo, reinforce_pp, online_dpo) and `rewards`."""

    num_generations: int = Field(
        4, ge=1, description="Completions sampled per prompt (the group the advantages compare; at least 2).")
    prompts_per_step: int = Field(
        4, ge=1, description="Prompts per generation batch, over all processes; the step trains on prompts_per_step "
        "x num_generations completions, in micro-batches of train.batch_size completions.")
    max_completion_length: int = Field(64, ge=1, description="Maximum new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    stop_strings: list[str] = Field(
        default_factory=list, description="Stop a completion after the token that completes one of these strings.")
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps on each generation batch (TRL's num_iterations, mu); > 1 keeps the "
        "sampling policy's log-probs for the importance ratio.")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are replaced by "
        "groups of further prompts, up to `max_resample` extra generation rounds.")
    max_resample: int = Field(2, ge=0, description="Extra generation rounds dynamic sampling may spend per step.")
    generation_batch_size: int = Field(
        64, ge=1, description="Sequences the generation engine decodes together.")
    log_completions_every: int = Field(
        10, ge=0, description="Write the step's prompts, completions and rewards to rollouts.jsonl every N steps "
        "(0: never).")


class Recipe(_Strict):
    """A whole fine-tuning run."""

    name: str = Field("run", description="Run name; the run directory is `<output_dir>/<name>`. One plain "
                                         "directory name: no `/`, `\\`, leading `.`, or control characters.")
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
    rollout: RolloutConfig | None = Field(
        None, description="On-line RL: sample with the policy between steps (docs/rl.md). null = train on data.")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Rewards scoring the rollouts: [{name, weight, options...}] (docs/rl.md).")
    iterate: IterateConfig | None = Field(
        None, description="Self-improvement rounds (`tunelab iterate`, docs/iterate.md): each round samples with the "
        "current model, scores, keeps or pairs, and trains this recipe on the result. null = one ordinary run.")

    @model_validator(mode="after")
    def _rollout_shape(self) -> "Recipe":
        if self.iterate is not None and self.rollout is not None:
            raise ValueError("`iterate` rounds train on data they generate; an on-line `rollout` section does not "
                             "combine with it (remove one)")
        if self.rollout is None:
            if self.rewards:
                raise ValueError("`rewards` score rollouts: add a `rollout` section (or remove `rewards`)")
            return self
        if not self.rewards:
            raise ValueError("a `rollout` section needs at least one entry in `rewards`")
        n = self.rollout.prompts_per_step * self.rollout.num_generations
        if n % self.train.batch_size:
            raise ValueError(f"rollout.prompts_per_step x rollout.num_generations = {n} completions per step must be "
                             f"a multiple of train.batch_size ({self.train.batch_size}), the micro-batch")
        if self.train.grad_accum != 1:
            raise ValueError("with a rollout section the micro-batches per step are prompts_per_step x "
                             "num_generations / train.batch_size: leave train.grad_accum at 1")
        return self

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, v: str) -> str:
        return check_component(v)  # `<output_dir>/<name>` must never leave output_dir

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
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
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
            loaded = yaml.safe_load(read_utf8(path))
        except NotUtf8 as e:
            raise RecipeError(str(e)) from None
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
        section = next((a for a in getattr(ann, "__args__", None) or () if isinstance(a, type)
                        and issubclass(a, BaseModel)), None) if ann is not None else None
        # an optional section (data.eval, rollout)
        if section is not None and type(None) in getattr(ann, "__args__", ()):
            rows.append((path, "see below" if info.default is None else "", info.description or ""))
            rows += describe_fields(section, path + ".")
            continue
        if info.default_factory is not None:
            default = info.get_default(call_default_factory=True)
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
