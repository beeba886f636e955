"""DeepSpeed ZeRO (`distributed.backend: deepspeed`; the optional extra `tunelab[deepspeed]`).

Rajbhandari et al. 2020 (ZeRO, https://arxiv.org/abs/1910.02054): stage 1 partitions the optimizer state
across processes, stage 2 also the gradients, stage 3 also the parameters (gathered per module around its
forward and backward); ZeRO-Offload / -Infinity keep the optimizer state (`offload_optimizer_device`) or the
parameters (`offload_param_device`, stage 3) in CPU memory or on NVMe.

The engine is `deepspeed.initialize` on the method's model and the optimizer tunelab builds (`train.optimizer`
over the method's parameter groups); accelerate / torchrun stay the launchers and the process group (gloo on
CPU, where `DS_ACCELERATOR=cpu` is DeepSpeed's own choice when no GPU is found). The config tunelab writes
(`deepspeed_config`) takes batch sizes, accumulation and clipping from `train.*`; `distributed.deepspeed.config`
passes anything else through.

How the loop's contract maps onto the engine:
* the model the loop runs is the ENGINE (its forward marks ZeRO-3's external parameters; calling the bare
  module under accumulation gave wrong gradients), evaluation and export use the bare module; the engine's
  forward keeps the loop's bf16 autocast only when its config enables `torch_autocast`, which tunelab does;
* `backward` is `engine.backward(loss, scale_wrt_gas=False)` (the loop already scales every micro-batch by the
  global unit count) with the accumulation boundary set explicitly: only the last micro-batch of a step
  (outside `no_sync`) reduces gradients;
* the optimizer the loop steps (`EngineOptimizer`) shares the client optimizer's `param_groups`, which
  DeepSpeed's ZeRO optimizer steps, so the loop's schedule sets the lr; its `step()` is `engine.step()`
  (clipping inside, from `gradient_clipping`: `clip_grad_norm` returns None and the log has no grad_norm);
* checkpoints are DeepSpeed's own (each process writes its partitions) inside tunelab's atomic step directory;
  they resume on the same number of processes (re-sharding is FSDP's: `distributed.backend: fsdp`);
* stage 3: every process evaluates and generates (forward passes gather parameters collectively), and export
  gathers one parameter at a time onto the main process into an unsharded twin (train/skeleton.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from tunelab.recipe import Recipe, RecipeError
from tunelab.train import checkpoint as ckpt
from tunelab.train.allocator import release_freed_memory
from tunelab.train.backends import Backend
from tunelab.train.skeleton import materialize, meta_skeleton

log = logging.getLogger(__name__)

FORMAT = "deepspeed"  # state.json's "checkpoint_format" (checkpoint.SHARDED_FORMATS)
ENGINE_DIR = "deepspeed"  # DeepSpeed's checkpoint directory inside a step directory
TAG = "zero"  # DeepSpeed's tag (sub-directory) within it
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise RecipeError("recipe field 'distributed.backend': 'deepspeed' needs the DeepSpeed package: "
                          f"pip install 'tunelab[deepspeed]' ({e})") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines
    return deepspeed


def user_config(recipe: Recipe) -> dict[str, Any]:
    """`distributed.deepspeed.config`: an inline mapping, or a JSON file read here."""
    raw = recipe.distributed.deepspeed.config
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    path = Path(raw)
    if not path.is_file():
        raise RecipeError(f"recipe field 'distributed.deepspeed.config': no such file {raw}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe field 'distributed.deepspeed.config': {raw} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe field 'distributed.deepspeed.config': {raw} must hold a JSON object")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _hidden_size(model: torch.nn.Module) -> int | None:
    from tunelab.core.unwrap import unwrap_peft

    cfg = getattr(unwrap_peft(model), "config", None)
    return getattr(cfg, "hidden_size", None)


def deepspeed_config(recipe: Recipe, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The engine's config: what `train.*` and `distributed.deepspeed.*` say, the pass-through merged over it.

    A pass-through value of a key tunelab owns (batch sizes, accumulation, clipping) must be "auto" or equal
    tunelab's; `optimizer` / `scheduler` sections are refused (`train.optimizer`, `train.scheduler` own them).
    With the model's `hidden_size` h, ZeRO's buckets are sized from it as transformers' Trainer does for "auto"
    (reduce bucket h^2, stage-3 prefetch 0.9 h^2, parameters under 10 h kept whole) instead of DeepSpeed's
    defaults (5e8 / 5e7 elements, sized for large GPUs); the pass-through can set them.
    """
    tc, dc = recipe.train, recipe.distributed.deepspeed
    zero: dict[str, Any] = {"stage": dc.zero_stage}
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if dc.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    offload = (("offload_optimizer", dc.offload_optimizer_device), ("offload_param", dc.offload_param_device))
    for kind, device in offload:
        if device != "none":
            zero[kind] = {"device": device, "pin_memory": torch.cuda.is_available()}
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # tunelab's AdamW (or the method's optimizer) is the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer state is offloaded
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own progress lines stay off
    }
    if tc.precision == "bf16":
        # the engine's forward switches an outer torch.autocast OFF unless its config enables torch_autocast (then
        # the model would run in its storage dtypes, not the loop's autocast); no module is "lower-precision safe",
        # so gradients are still reduced in fp32, as under DDP and FSDP2
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    user = user_config(recipe)
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise RecipeError(f"recipe field 'distributed.deepspeed.config': no {key!r} section; train.{key} sets it")
    for key in OWNED:
        if key in user and user[key] != "auto" and user[key] != ours[key]:
            raise RecipeError(f"recipe field 'distributed.deepspeed.config': {key}={user[key]!r} differs from the "
                              f"{ours[key]!r} that train.* gives; set it through train.* (or leave it out)")
    user = {k: v for k, v in user.items() if not (k in OWNED and v == "auto")}
    return _merge(ours, user)


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a DeepSpeed checkpoint, whole, in one process (DeepSpeed's zero_to_fp32)."""
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(Path(path) / ENGINE_DIR), tag=TAG,
                                                         exclude_frozen_parameters=True))


class EngineOptimizer(torch.optim.Optimizer):
    """What the loop steps: the client optimizer's parameter groups (the lr the schedule sets is the one the
    engine's ZeRO optimizer uses), `step()` = `engine.step()`, `zero_grad()` nothing (the engine zeroes)."""

    def __init__(self, engine: Any, client: torch.optim.Optimizer):  # noqa: D107 - no Optimizer.__init__: shares
        self.engine, self.client = engine, client
        self.defaults = client.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    # Read through, never copied: loading a checkpoint replaces the client's `param_groups` list (torch's
    # Optimizer.load_state_dict), and a copy would leave the schedule setting the lr of groups no one steps.
    @property
    def param_groups(self):
        return self.client.param_groups

    @property
    def state(self):
        return self.client.state

    def step(self, closure=None):
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self):
        raise RuntimeError("DeepSpeed's optimizer state is saved by the engine (DeepSpeedBackend.save_checkpoint)")


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO over accelerate's process group (see the module docstring)."""

    name = "deepspeed"
    sharded = True  # the optimizer state always; gradients from stage 2, parameters at stage 3

    def __init__(self, accelerator: Any, recipe: Recipe | None = None):
        super().__init__(accelerator, recipe)
        if self.recipe.train.precision == "fp16":  # resolved: `auto` gives fp16 on GPUs without bf16
            raise RecipeError(f"recipe field 'train.precision': fp16 needs loss scaling, which distributed.backend="
                              f"{self.name} does not wire in yet; use bf16 (GPUs from Ampere on) or fp32, or ddp")
        self.engine: Any = None
        self._boundary = True
        self._skeleton: torch.nn.Module | None = None

    @classmethod
    def check(cls, recipe: Recipe) -> None:
        _import_deepspeed()
        dc = recipe.distributed.deepspeed
        if dc.offload_param_device != "none" and dc.zero_stage != 3:
            raise RecipeError("recipe field 'distributed.deepspeed.offload_param_device': parameters are offloaded "
                              f"at zero_stage 3 only (it is {dc.zero_stage})")
        cfg = deepspeed_config(recipe, 1)  # refuses conflicting pass-through values now, before any run directory
        zero = cfg.get("zero_optimization", {})
        for kind in ("offload_optimizer", "offload_param"):
            if zero.get(kind, {}).get("device") == "nvme" and not zero[kind].get("nvme_path"):
                raise RecipeError(f"recipe field 'distributed.deepspeed.config': {kind} to nvme needs "
                                  f"zero_optimization.{kind}.nvme_path")

    @property
    def stage(self) -> int:
        return int(deepspeed_config(self.recipe, 1)["zero_optimization"].get("stage", 0))

    @property
    def is_eval_process(self) -> bool:
        return self.stage == 3 or self.is_main_process  # stage 3: forward passes are collective

    @property
    def is_generate_process(self) -> bool:
        return True

    def prepare(self, model, make_optimizer):
        deepspeed = _import_deepspeed()
        if self.stage == 3:
            self._skeleton = meta_skeleton(model)  # before the parameters are partitioned
        client = make_optimizer(model)
        config = deepspeed_config(self.recipe, self.num_processes, hidden_size=_hidden_size(model))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config,
                                               dist_init_required=False)
        self.engine = engine
        return engine, EngineOptimizer(engine, client)

    def backward(self, loss):
        self.engine.set_gradient_accumulation_boundary(self._boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self, model):
        self._boundary = False  # a micro-batch before the step's last: accumulate, do not reduce
        try:
            yield
        finally:
            self._boundary = True

    def end_step(self):
        if self.device.type == "cpu":  # as FSDP2 (train/fsdp.py): free heap pages back between steps
            release_freed_memory()

    def clip_grad_norm(self, params, max_norm):
        return None  # the engine clips inside its step (`gradient_clipping`) and reports no norm before it

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, run_dir, step, *, model, method, optimizer, state, keep):
        # every process writes its partitions; frozen weights come from the base model, not from checkpoints
        return ckpt.save_collective_checkpoint(
            run_dir, step, state={**state, "checkpoint_format": FORMAT, "world_size": self.num_processes,
                                  "zero_stage": self.stage}, keep=keep,
            write=lambda tmp: self.engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=TAG, save_latest=False,
                                                          exclude_frozen_parameters=True))

    def load_checkpoint(self, path, *, model, method, optimizer):
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        if state.get("checkpoint_format") != FORMAT:
            raise RecipeError(f"{path} was not written by distributed.backend=deepspeed: resume it with the "
                              f"backend that wrote it ({'fsdp' if state.get('checkpoint_format') else 'ddp'})")
        if state.get("world_size") != self.num_processes or state.get("zero_stage") != self.stage:
            raise RecipeError(f"{path} holds ZeRO-{state.get('zero_stage')} partitions of "
                              f"{state.get('world_size')} processes; resume it on as many, at the same stage "
                              "(distributed.backend=fsdp checkpoints re-shard onto any number)")
        self.engine.load_checkpoint(str(path / ENGINE_DIR), tag=TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        rng_file = path / f"rng-{self.process_index}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
        return state

    # -- export ------------------------------------------------------------------------------------------
    def gather_full_state(self, model):
        module = self.engine.module if self.engine is not None else model
        if self.stage != 3:  # the module's parameters are whole on every process
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_main_process \
                else None
        import deepspeed

        full: dict[str, torch.Tensor] = {}
        # one parameter at a time (every process, same order): never more than one extra full tensor in memory
        for name, p in module.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.is_main_process:
                    full[name] = p.detach().cpu().clone()
        if not self.is_main_process:
            return None
        persistent = set(module.state_dict().keys())  # buffers that belong in a state dict
        full.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
        return full

    def export_model(self, model):
        if self.engine is None:  # never prepared (a run that did not train): the model is whole already
            return model if self.is_main_process else None
        full = self.gather_full_state(model)
        if not self.is_main_process:
            return None
        if self.stage != 3:
            return self.engine.module
        assert self._skeleton is not None  # made in prepare at stage 3
        return materialize(self._skeleton, full)
