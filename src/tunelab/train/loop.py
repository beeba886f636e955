"""The one training loop, on accelerate.

Per optimizer step:
  1. this process takes its `grad_accum` micro-batches of the step's global window (StepSampler);
  2. the number of loss units (target tokens, or pairs) of the WHOLE global batch is all-reduced first,
     so each micro-batch's loss SUM is divided by the same global count. DDP averages gradients over
     processes, so the scale is world_size / global_units. The resulting gradient equals that of one
     big batch with a token-mean loss, whatever the split into micro-batches and processes;
  3. forward under autocast (bf16 by default, on CPU too: AMX makes it ~7x faster than fp32 there),
     backward, gradient sync on the last micro-batch only;
  4. a non-finite loss stops the run before the update (TrainingDiverged), so the last checkpoint stays good;
  5. clip, AdamW step, schedule step, the method's per-step hook, log, eval, checkpoint.
Resuming restores trainable weights, optimizer, scheduler, RNG and method state; the data position is
the step number itself (see StepSampler), so the resumed loss curve equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from tunelab.data.batching import COLLATORS, StepSampler, make_collator
from tunelab.methods.registry import Method
from tunelab.objectives.base import Objective
from tunelab.recipe import Recipe
from tunelab.track.run import MetricsLog, peak_memory_mb
from tunelab.train import checkpoint as ckpt
from tunelab.train.engine import compiled_layers
from tunelab.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was updated or saved for that step."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    wall_time_s: float
    tokens_per_s: float
    peak_memory_mb: float
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)


def autocast_context(device: torch.device, precision: str):
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def count_units(objective: Objective, batch: dict[str, torch.Tensor]) -> int:
    """Loss units of a micro-batch, known before the forward pass (needed to normalise up front)."""
    if objective.unit == "token":
        return int((batch["labels"][:, 1:] != -100).sum())
    key = "input_ids" if "input_ids" in batch else "chosen_input_ids"
    return int(batch[key].shape[0])


def _tokens_in(batch: dict[str, torch.Tensor]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask") or k == "real_token_mask"))


@torch.no_grad()
def evaluate_loss(model, objective: Objective, data: list[dict], *, batch_size: int, pad_id: int,
                  device: torch.device, precision: str, ref=None) -> float:
    """Mean held-out loss per unit (per target token for SFT)."""
    was_training = model.training
    model.eval()
    collate = COLLATORS[objective.batch_kind]
    total = units = 0.0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i: i + batch_size], pad_id).items()}
        with autocast_context(device, precision):
            out = objective.compute(model, batch, ref)
        total += float(out.loss_sum)
        units += float(out.n_units)
    model.train(was_training)
    return total / max(units, 1.0)


def _all_reduce_sum(accelerator, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def forward_backward(model, objective: Objective, micro: list[dict[str, torch.Tensor]], accelerator,
                     precision: str, ref=None) -> tuple[float, dict[str, float], float, float]:
    """Accumulate the gradient of one optimizer step over this process's micro-batches.

    Each micro-batch's loss SUM is scaled by world_size / (units in the whole global batch), counted and
    all-reduced before any forward pass, so the summed gradient is that of the global token-mean loss.
    Returns (local loss sum, local metric sums, global units, global attended tokens).
    """
    world = accelerator.num_processes
    local_units = sum(count_units(objective, b) for b in micro)
    local_tokens = sum(_tokens_in(b) for b in micro)
    global_units, global_tokens = _all_reduce_sum(accelerator, [local_units, local_tokens])
    scale = world / max(global_units, 1.0)
    loss_sum_local, metric_sums = 0.0, {}
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
        with ctx:
            with autocast_context(accelerator.device, precision):
                out = objective.compute(model, batch, ref)
            accelerator.backward(out.loss_sum * scale)
        loss_sum_local += float(out.loss_sum.detach())
        for k, v in out.metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    return loss_sum_local, metric_sums, global_units, global_tokens


def train(recipe: Recipe, model, method: Method, objective: Objective, train_data: list[dict], *,
          run_dir: Path, accelerator, pad_id: int, eval_data: list[dict] | None = None, resume: bool = False,
          ref=None, on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model` (already prepared by `method`) on encoded examples; returns what happened."""
    tc = recipe.train
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = StepSampler(len(train_data), tc.batch_size, tc.grad_accum, world, rank, tc.seed)
    total_steps = tc.max_steps or sampler.steps_for_epochs(tc.epochs)
    collate = make_collator(objective.batch_kind, recipe.data)

    optimizer = method.build_optimizer(model, tc) or build_optimizer(method.param_groups(model, tc.weight_decay), tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    unwrapped = model
    model, optimizer = accelerator.prepare(model, optimizer)
    # every parameter the optimizer holds: methods may switch requires_grad during training (LISA)
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    metrics = MetricsLog(run_dir, enabled=accelerator.is_main_process)

    start_step = 0
    if resume and (path := ckpt.latest_checkpoint(run_dir)) is not None:
        loaded = ckpt.load_checkpoint(path, rank)
        method.load_trainable_state_dict(unwrapped, loaded["trainable"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["state"]["scheduler"])
        method.load_state_dict(loaded["state"].get("method", {}))
        if loaded["rng"] is not None:
            ckpt.set_rng_state(loaded["rng"])
        start_step = loaded["state"]["step"]
        metrics.truncate_after(start_step)
        accelerator.print(f"resumed from {path} (step {start_step} of {total_steps})")
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir}; starting from step 0")

    def save(step: int) -> None:
        rngs = [ckpt.rng_state()]
        if world > 1:  # gather every process's RNG state so each resumes its own stream
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if accelerator.is_main_process:
            ckpt.save_checkpoint(run_dir, step, trainable=method.trainable_state_dict(unwrapped),
                                 optimizer_state=optimizer.state_dict(),
                                 state={"scheduler": scheduler.state_dict(), "method": method.state_dict(),
                                        "total_steps": total_steps, "examples_seen": step * sampler.global_batch},
                                 rng_states=rngs, keep=tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    method.on_train_start(unwrapped, total_steps)
    model.train()
    losses: list[float] = []
    eval_losses: dict[int, float] = {}
    tokens_total = 0
    t_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and accelerator.is_local_main_process))
    with compiled_layers(unwrapped, tc.compile):  # regional torch.compile for the steps only (train.compile)
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro = [{k: v.to(device) for k, v in collate([train_data[i] for i in idx], pad_id).items()}
                     for idx in sampler.micro_batches(step)]
            custom = method.custom_step(model=model, batches=micro, objective=objective, optimizer=optimizer,
                                        lr=scheduler.get_last_lr()[0], step=step, ref=ref, accelerator=accelerator)
            if custom is not None:
                loss_sum_local, metric_sums, global_units, global_tokens = custom
            else:
                loss_sum_local, metric_sums, global_units, global_tokens = forward_backward(
                    model, objective, micro, accelerator, tc.precision, ref)
            names = sorted(metric_sums)
            reduced = _all_reduce_sum(accelerator, [loss_sum_local] + [metric_sums[k] for k in names])
            loss = reduced[0] / max(global_units, 1.0)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}; stopped before the update. The last good checkpoint is "
                    f"{ckpt.latest_checkpoint(run_dir) or 'none (no checkpoint was saved yet)'}. Try a lower train.lr, "
                    f"train.max_grad_norm, or train.precision=fp32.")
            if custom is None:
                method.after_backward(unwrapped, step + 1)
                grad_norm = None
                if tc.max_grad_norm is not None:
                    grad_norm = float(accelerator.clip_grad_norm_(clip_params, tc.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = None
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            method.on_step_end(unwrapped, step + 1, optimizer)

            dt = time.perf_counter() - t0
            tokens_total += int(global_tokens)
            losses.append(loss)
            record = {"step": step + 1, "loss": loss, "lr": lr, "tokens": int(global_tokens),
                      "tokens_per_s": global_tokens / dt, "step_time_s": dt, "memory_mb": peak_memory_mb(device)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            record.update({k: v / max(global_units, 1.0) for k, v in zip(names, reduced[1:])})
            if tc.eval_every and eval_data and (step + 1) % tc.eval_every == 0:
                eval_losses[step + 1] = record["eval_loss"] = evaluate_loss(
                    model, objective, eval_data, batch_size=recipe.eval.batch_size, pad_id=pad_id, device=device,
                    precision=tc.precision, ref=ref)
            if (step + 1) % tc.log_every == 0 or step + 1 == total_steps:
                metrics.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{global_tokens / dt:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, loss)
            if (tc.save_every and (step + 1) % tc.save_every == 0) or step + 1 == total_steps:
                save(step + 1)
    bar.close()
    wall = time.perf_counter() - t_start
    return TrainResult(steps=total_steps, final_loss=losses[-1] if losses else float("nan"), tokens=tokens_total,
                       wall_time_s=wall, tokens_per_s=tokens_total / max(wall, 1e-9),
                       peak_memory_mb=peak_memory_mb(device), losses=losses, eval_losses=eval_losses)
