"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) over the method's parameter groups, with
linear warmup followed by cosine decay to zero, linear decay, or a constant rate.

`train.optimizer` picks an entry of OPTIMIZERS; which device each works on:
  adamw             torch.optim.AdamW, fused (one kernel over all tensors; foreach  CPU and CUDA
                    where fused does not apply)
  adamw_8bit        bitsandbytes AdamW8bit: moments in blockwise-quantised int8   CPU and CUDA (CPU backend
                    (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861);     checked with bitsandbytes
                    tensors under 4096 entries keep 32-bit state                  0.50.2)
  paged_adamw_8bit  bitsandbytes PagedAdamW8bit: as adamw_8bit, state in CUDA     CUDA; on CPU bitsandbytes
                    unified memory that pages to host RAM under memory pressure   falls back to adamw_8bit
  paged_adamw       bitsandbytes PagedAdamW: 32-bit state, paged                  CUDA; CPU falls back to unpaged
bitsandbytes states are plain tensors, so their checkpoints load with torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
import math

import torch

from tunelab.recipe import TrainConfig

log = logging.getLogger(__name__)


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW: on 2 CPU cores, 108M fp32 parameters step in 46 ms against 254 ms with foreach, with
    0.68x its extra peak RSS (`benchmarks/engine_levers.py`). Fused needs floating tensors of one device type."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() for p in params) and \
        len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                 **({"fused": True} if fused else {"foreach": True}))
    except (RuntimeError, ValueError) as e:  # an older torch without fused AdamW on this device
        log.debug("fused AdamW unavailable (%s); using foreach", e)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


def _bitsandbytes(class_name: str):
    def factory(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
        try:
            import bitsandbytes as bnb
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError(f"train.optimizer={cfg.optimizer!r} needs bitsandbytes "
                             "(pip install bitsandbytes)") from None
        cls = getattr(bnb.optim, class_name)
        on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
        if class_name.startswith("Paged") and on_cpu:
            log.warning("train.optimizer=%s: paging needs CUDA; on CPU bitsandbytes runs it unpaged", cfg.optimizer)
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    return factory


# name -> factory(param groups, train config); methods with an optimizer of their own bypass this table
OPTIMIZERS = {
    "adamw": _adamw,
    "adamw_8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw_8bit": _bitsandbytes("PagedAdamW8bit"),
    "paged_adamw": _bitsandbytes("PagedAdamW"),
}


def build_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups if g["params"]]
    if not groups:
        raise ValueError("the method left no trainable parameter")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based: the factor used for the step's update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler)
    )
