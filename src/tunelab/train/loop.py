"""The one training loop, on accelerate, between two seams: a batch source and a distributed backend.

Per optimizer step:
  1. the batch SOURCE (train/sources.py) gives this process's `grad_accum` micro-batches of the step, on the
     device (the static source: the step's global window of a fixed dataset; a generating source runs the model
     in `generation_mode`: eval mode, no grad, no compiled regions);
  2. the number of loss units (target tokens, or pairs) of the WHOLE global batch is all-reduced first,
     so each micro-batch's loss SUM is divided by the same global count. DDP averages gradients over
     processes, so the scale is world_size / global_units. The resulting gradient equals that of one
     big batch with a token-mean loss, whatever the split into micro-batches and processes;
  3. forward under autocast in `train.precision` (`auto`, resolved where the run starts: bf16 where the device
     computes it natively, AMX making it ~7x faster than fp32 on CPU; fp32 on CPUs without; fp16 with
     accelerate's GradScaler on GPUs without bf16, which the backend's backward, clip and the prepared
     optimizer's step apply), backward, gradient sync on the last micro-batch only;
  4. a non-finite loss stops the run before the update (TrainingDiverged), so the last checkpoint stays good;
  5. clip (global norm), optimizer step, schedule step, the method's per-step hook, log, eval, checkpoint.
The BACKEND (train/backends.py) prepares the model and then the optimizer, runs backward / no_sync /
all-reduces, clips, saves and loads checkpoints (every process calls it) and says which processes evaluate.
Resuming restores trainable weights, optimizer, scheduler, RNG, method and source state, so the resumed
loss curve equals the uninterrupted one.

train/ sits below methods/ and objectives/: the loop is typed with the Protocols of train/interfaces.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tunelab.core.precision import AUTOCAST_DTYPES, autocast_context  # noqa: F401 (re-exported)
from tunelab.core.rundir import MetricsLog, peak_memory_mb
from tunelab.data.batching import COLLATORS
from tunelab.recipe import Recipe
from tunelab.train import checkpoint as ckpt
from tunelab.train.backends import Backend
from tunelab.train.engine import compiled_layers, resolve_compile
from tunelab.train.interfaces import StepResult, TrainMethod, TrainObjective
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.sources import BatchSource, generation_mode

log = logging.getLogger(__name__)

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


def count_units(objective: TrainObjective, batch: dict[str, torch.Tensor]) -> int:
    """Loss units of a micro-batch, known before the forward pass (needed to normalise up front)."""
    if objective.unit == "token":
        return int((batch["labels"][:, 1:] != -100).sum())
    key = "input_ids" if "input_ids" in batch else "chosen_input_ids"
    return int(batch[key].shape[0])


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Attended (non-padding) tokens of a micro-batch, for throughput."""
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask") or k == "real_token_mask"))


def global_counts(objective: TrainObjective, micro: list[dict[str, torch.Tensor]],
                  backend: Backend) -> tuple[float, float]:
    """(loss units, attended tokens) of the step's whole global batch: this process's micro-batches, summed
    over processes. Known before any forward pass, so every micro-batch is scaled by the same count."""
    local = [float(sum(count_units(objective, b) for b in micro)), float(sum(count_tokens(b) for b in micro))]
    units, tokens = backend.reduce_sum(local)
    return units, tokens


@torch.no_grad()
def evaluate_loss(model, objective: TrainObjective, data: list[dict], *, batch_size: int, pad_id: int,
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


def forward_backward(model, objective: TrainObjective, micro: list[dict[str, torch.Tensor]], backend: Backend,
                     precision: str, ref=None) -> StepResult:
    """Accumulate the gradient of one optimizer step over this process's micro-batches.

    Each micro-batch's loss SUM is scaled by world_size / (units in the whole global batch), counted and
    all-reduced before any forward pass, so the summed gradient is that of the global token-mean loss.
    Gradients are all-reduced on the last micro-batch only (`backend.no_sync` on the others).
    """
    world = backend.num_processes
    global_units, global_tokens = global_counts(objective, micro, backend)
    scale = world / max(global_units, 1.0)
    loss_sum_local = 0.0
    metric_sums: dict[str, float] = {}
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        with contextlib.nullcontext() if sync else backend.no_sync(model):
            with autocast_context(backend.device, precision):
                out = objective.compute(model, batch, ref)
            backend.backward(out.loss_sum * scale)
        loss_sum_local += float(out.loss_sum.detach())
        for k, v in out.metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    return StepResult(loss_sum_local, metric_sums, global_units, global_tokens)


def source_metrics(source: BatchSource) -> dict[str, float]:
    """What a source reports about its last step (`metrics()`, optional: sources without it report nothing)."""
    get = getattr(source, "metrics", None)
    return dict(get()) if callable(get) else {}


def train(recipe: Recipe, model, method: TrainMethod, objective: TrainObjective, source: BatchSource, *,
          run_dir: Path, backend: Backend, pad_id: int, eval_data: list[dict] | None = None, resume: bool = False,
          ref=None, on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model` (already prepared by `method`) on the batches of `source`; returns what happened."""
    tc = recipe.train
    device = backend.device
    total_steps = source.steps if source.steps is not None else tc.max_steps
    if total_steps is None:
        raise ValueError("this batch source has no length of its own: set train.max_steps")

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return method.build_optimizer(m, tc) or build_optimizer(method.param_groups(m, tc.weight_decay), tc)

    unwrapped = model
    model, optimizer = backend.prepare(model, make_optimizer)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    # every parameter the optimizer holds: methods may switch requires_grad during training (LISA)
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    metrics = MetricsLog(run_dir, enabled=backend.is_main_process)
    accelerator = backend.accelerator  # printing and trackers only

    start_step = 0
    if resume and (path := ckpt.latest_checkpoint(run_dir)) is not None:
        state = backend.load_checkpoint(path, model=unwrapped, method=method, optimizer=optimizer)
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state.get("method", {}))
        if "source" in state:
            source.load_state_dict(state["source"])
        start_step = state["step"]
        metrics.truncate_after(start_step)
        accelerator.print(f"resumed from {path} (step {start_step} of {total_steps})")
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir}; starting from step 0")

    def save(step: int) -> None:
        backend.save_checkpoint(run_dir, step, model=unwrapped, method=method, optimizer=optimizer,
                                state={"scheduler": scheduler.state_dict(), "method": method.state_dict(),
                                       "source": source.state_dict(), "total_steps": total_steps},
                                keep=tc.keep_checkpoints)

    method.on_train_start(unwrapped, total_steps)
    model.train()
    losses: list[float] = []
    eval_losses: dict[int, float] = {}
    tokens_total = 0
    done = start_step
    t_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and accelerator.is_local_main_process))
    # regional torch.compile for the steps only (train.compile; `auto`: on CPU, unsharded, SFT-family batches, and
    # methods that do not opt out)
    compile_layers = resolve_compile(tc.compile, device, backend.sharded, objective.batch_kind,
                                     method.capabilities.eager_by_default)
    with compiled_layers(unwrapped, compile_layers, tc):
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            with generation_mode(unwrapped) if source.generates else contextlib.nullcontext():
                micro = source.micro_batches(step, unwrapped)
            t_source = time.perf_counter() - t0
            if not micro:  # a source without a fixed length ran dry: the run ends here
                accelerator.print(f"the batch source has no more batches after step {step}")
                if done > start_step and not (tc.save_every and done % tc.save_every == 0):
                    save(done)
                break
            custom = method.capabilities.custom_step  # the method's declared update rule (MeZO), never probed
            if custom:
                result = method.custom_step(model=model, batches=micro, objective=objective, optimizer=optimizer,
                                            lr=scheduler.get_last_lr()[0], step=step, ref=ref, backend=backend)
            else:
                result = forward_backward(model, objective, micro, backend, tc.precision, ref)
            names = sorted(result.metric_sums)
            reduced = backend.reduce_sum([result.loss_sum] + [result.metric_sums[k] for k in names])
            global_units, global_tokens = result.global_units, result.global_tokens
            loss = reduced[0] / max(global_units, 1.0)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}; stopped before the update. The last good checkpoint is "
                    f"{ckpt.latest_checkpoint(run_dir) or 'none (no checkpoint was saved yet)'}. Try a lower train.lr, "
                    f"train.max_grad_norm, or train.precision=fp32.")
            grad_norm = None  # absent from the record when not clipped, or when the backend reports no norm
            if not custom:
                method.after_backward(unwrapped, step + 1)
                if tc.max_grad_norm is not None:
                    grad_norm = backend.clip_grad_norm(clip_params, tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            method.on_step_end(unwrapped, step + 1, optimizer)
            backend.end_step()
            done = step + 1

            dt = time.perf_counter() - t0
            tokens_total += int(global_tokens)
            losses.append(loss)
            record: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": lr, "tokens": int(global_tokens),
                                      "tokens_per_s": global_tokens / dt, "step_time_s": dt,
                                      "memory_mb": peak_memory_mb(device)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            record.update({k: v / max(global_units, 1.0) for k, v in zip(names, reduced[1:])})
            if source.generates:  # a generating source's own metrics (rollouts: rewards, lengths, accuracy)
                record.update(source_metrics(source))
                record["rollout_time_s"], record["update_time_s"] = t_source, dt - t_source
            if tc.eval_every and eval_data and (step + 1) % tc.eval_every == 0 and backend.is_eval_process:
                eval_losses[step + 1] = record["eval_loss"] = evaluate_loss(
                    unwrapped, objective, eval_data, batch_size=recipe.eval.batch_size, pad_id=pad_id,
                    device=device, precision=tc.precision, ref=ref)
            if (step + 1) % tc.log_every == 0 or step + 1 == total_steps:
                metrics.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{global_tokens / dt:.0f}",
                            **{k: f"{record[k]:.3f}" for k in ("reward", "accuracy") if k in record})
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, loss)
            if (tc.save_every and (step + 1) % tc.save_every == 0) or step + 1 == total_steps:
                save(step + 1)
    bar.close()
    wall = time.perf_counter() - t_start
    return TrainResult(steps=done, final_loss=losses[-1] if losses else float("nan"), tokens=tokens_total,
                       wall_time_s=wall, tokens_per_s=tokens_total / max(wall, 1e-9),
                       peak_memory_mb=peak_memory_mb(device), losses=losses, eval_losses=eval_losses)
