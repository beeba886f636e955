"""`gradient`: LESS, influence of each example on a small target set through LoRA gradients.

Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning",
https://arxiv.org/abs/2402.04333; reference code github.com/princeton-nlp/LESS. Steps, as there:
  1. warm-up: a LoRA adapter is trained on a random `warmup_fraction` (5%) of the pool for `warmup_epochs`
     (4) epochs with AdamW and a linear schedule (3% warm-up), a checkpoint kept at the end of every epoch
     (its LoRA weights and Adam's moments m, v); at B = 0 the gradient w.r.t. A would vanish, so the
     warm-up is also what makes the gradients informative;
  2. at each checkpoint c, each pool example's gradient g of its mean response loss w.r.t. the LoRA
     parameters [D] becomes Adam's update direction, with eps INSIDE the square root as in LESS's
     `obtain_gradients_with_adam` (no bias correction):
         m' = b1 m + (1-b1) g,   v' = b2 v + (1-b2) g^2,   Gamma(g) = m' / sqrt(v' + eps);
     each target example keeps its plain (SGD) gradient, as LESS uses for the validation set;
  3. both are projected to `proj_dim` dimensions by one random Rademacher matrix R [D, d] (entries
     +-1/sqrt(d), the same R at every checkpoint, as LESS's fixed model_id) and L2-normalised;
  4. the influence is the checkpoint-weighted sum of cosine similarities (LESS's `matching.py`),
         Inf(z, z') = sum_c w_c cos(Gamma_c(z), grad_c(z')),   w_c = mean learning rate of epoch c / sum,
     averaged over the target examples (`aggregate: mean`, LESS's per-task mean) or their maximum.
R is never stored whole: chunks of its rows are regenerated from a seed for each batch of gradients.
One forward + backward per example per checkpoint, so this is the slowest scorer (LESS reports the same).
The paper's reference setting: LoRA r = 128, alpha = 512 on q, k, v, o; lr 2e-5; effective batch 32;
5% of the data for 4 epochs; proj_dim 8192. The defaults keep LESS's warm-up, schedule and checkpoints but a
smaller adapter (r = 8 on q_proj, v_proj) and projection (1024) for CPU; `warmup_epochs: 1` is a single
checkpoint (LESS's cheapest ablation).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from tunelab.core.precision import autocast_context
from tunelab.selection.lm import _pad, pad_id_of, response_input
from tunelab.selection.registry import ScoreOutput, Scorer, as_chat, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions

ROWS_PER_CHUNK = 1 << 16  # rows of R generated at once: [65536, d] int8 -> float


class GradientOptions(LMScorerOptions):
    target: str = Field(..., description="File of target-task examples (any supported data format).")
    target_n: int | None = Field(None, ge=1, description="Use the first n target examples.")
    lora_r: int = Field(8, ge=1, description="LoRA rank of the warm-up adapter (LESS: 128).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (LESS: 512).")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="LoRA targets (LESS: q_proj, k_proj, v_proj, o_proj).")
    warmup_fraction: float = Field(0.05, gt=0, le=1, description="Fraction of the pool the warm-up trains on "
                                                                 "(LESS: 5%).")
    warmup_epochs: int = Field(4, ge=1, description="Warm-up epochs; one checkpoint at the end of each (LESS: 4).")
    warmup_batch_size: int = Field(32, ge=1, description="Examples per warm-up step (LESS: 1 x 32 accumulated).")
    lr: float = Field(2e-5, gt=0, description="Peak warm-up learning rate (LESS: 2e-5), linear decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear learning-rate warm-up (LESS: 0.03).")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    proj_dim: int = Field(1024, ge=8, description="Dimension d of the random projection (LESS: 8192).")
    projection_batch: int = Field(64, ge=1, description="Gradients projected together (R chunks regenerated per "
                                                         "batch).")
    aggregate: str = Field("mean", pattern="^(mean|max)$", description="Over target examples: mean (LESS) or max.")
    seed: int = 0


def rademacher_chunk(seed: int, chunk: int, rows: int, dim: int) -> torch.Tensor:
    """Rows [chunk * ROWS_PER_CHUNK, + rows) of R: entries +-1/sqrt(dim), [rows, dim] float32, reproducible."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    return (torch.randint(0, 2, (rows, dim), generator=g, dtype=torch.int8).float() * 2 - 1) / math.sqrt(dim)


def project(grads: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """grads [B, D] -> grads @ R  [B, dim], R generated chunk by chunk."""
    out = torch.zeros(grads.shape[0], dim)
    for c, start in enumerate(range(0, grads.shape[1], ROWS_PER_CHUNK)):
        block = grads[:, start: start + ROWS_PER_CHUNK]
        out += block @ rademacher_chunk(seed, c, block.shape[1], dim)
    return out


def adam_direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, betas, eps: float) -> torch.Tensor:
    """LESS's Adam-preconditioned gradient: m' / sqrt(v' + eps), with m' = b1 m + (1-b1) g and
    v' = b2 v + (1-b2) g^2 (eps inside the root, no bias correction: `obtain_gradients_with_adam`)."""
    m1 = betas[0] * m + (1 - betas[0]) * g
    v1 = betas[1] * v + (1 - betas[1]) * g * g
    return m1 / torch.sqrt(v1 + eps)


def linear_schedule(total_steps: int, warmup_ratio: float):
    """HF's linear schedule with warm-up (LESS's `lr_scheduler_type linear`, `warmup_ratio`): the factor of
    the peak lr at step k (0-based), warm-up steps = ceil(ratio * total)."""
    warm = math.ceil(total_steps * warmup_ratio)

    def factor(k: int) -> float:
        if k < warm:
            return k / max(1, warm)
        return max(0.0, (total_steps - k) / max(1, total_steps - warm))

    return factor


def checkpoint_weights(epoch_lrs: list[list[float]]) -> list[float]:
    """LESS's checkpoint weights: the mean learning rate of each epoch's steps, normalised to sum to 1."""
    means = [float(np.mean(lrs)) if lrs else 0.0 for lrs in epoch_lrs]
    total = sum(means)
    return [m / total for m in means] if total > 0 else [1.0 / len(means)] * len(means)


@register_scorer("gradient", paper="https://arxiv.org/abs/2402.04333")
class Gradient(Scorer):
    Config = GradientOptions

    def _target_examples(self, ctx) -> list:
        from tunelab.data.formats import load_records
        from tunelab.data.pipeline import records_to_examples
        from tunelab.recipe import DataConfig, DatasetSpec

        spec = DatasetSpec(path=self.config.target, n=self.config.target_n)
        return records_to_examples(load_records(spec.path, n=spec.n), spec, DataConfig())

    def score(self, examples, ctx) -> ScoreOutput:
        from tunelab.assemble import prepare_without_data
        from tunelab.model import load_model

        cfg = self.config
        tok = ctx.tokenizer(cfg.model)
        target = self._target_examples(ctx)
        for ex in target:
            if (why := self.check(ex)) is not None:
                raise ValueError(f"gradient target {ex.origin}: {why}")
        torch.manual_seed(cfg.seed)
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": cfg.target_modules}
        _, model = prepare_without_data(load_model(ctx.model_config(cfg.model)), "lora", lora)
        model = model.to(ctx.device)
        params = [p for p in model.parameters() if p.requires_grad]

        def encode(ex):
            r = response_input(tok, as_chat(ex), max_length=cfg.max_length, max_response_tokens=cfg.max_response_tokens)
            return r.cond_ids, r.cond_start

        pool = [encode(ex) for ex in examples]
        targets = [encode(ex) for ex in target]
        epoch_lrs, per_ckpt = [], []  # per checkpoint c: the epoch's lrs, cos sims [N, n_target]
        for lrs, (m, v) in self._warmup(model, params, pool, pad_id_of(tok), ctx):
            model.eval()  # at the end of warm-up epoch c, this checkpoint's gradients
            c = len(per_ckpt) + 1
            t = self._projected(model, params, targets, None, ctx, f"LESS target (checkpoint {c})")
            x = self._projected(model, params, pool, (m, v), ctx, f"LESS pool (checkpoint {c})")
            per_ckpt.append((x @ t.T).double())  # rows unit-norm: cosine similarities
            epoch_lrs.append(lrs)
            model.train()
        sims = sum(w * s_c for w, s_c in zip(checkpoint_weights(epoch_lrs), per_ckpt))  # [N, n_target]
        values = sims.mean(1) if cfg.aggregate == "mean" else sims.max(1).values
        return ScoreOutput(values.numpy())

    def _loss(self, model, rows: list[tuple[list[int], int]], pad_id: int, ctx) -> torch.Tensor:
        """Mean response-token loss of a padded batch (labels: -100 outside the responses)."""
        ids, mask = _pad([r for r, _ in rows], pad_id)
        labels = torch.full_like(ids, -100)
        for b, (r, s) in enumerate(rows):
            labels[b, s: len(r)] = ids[b, s: len(r)]
        with autocast_context(ctx.device, self.config.precision):
            out = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device), use_cache=False)
        logits = out.logits[:, :-1].float()  # [B, T-1, V]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1).to(ctx.device), ignore_index=-100)

    def _warmup(self, model, params, pool, pad_id, ctx):
        """Train the adapter on a random warmup_fraction of the pool; yield (the epoch's learning rates,
        Adam's (m, v)) at the end of every epoch, the model then being that epoch's checkpoint."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        n_warm = max(1, round(cfg.warmup_fraction * len(pool)))
        subset = torch.randperm(len(pool), generator=g)[:n_warm].tolist()
        bs = min(cfg.warmup_batch_size, n_warm)
        steps_per_epoch = math.ceil(n_warm / bs)
        factor = linear_schedule(steps_per_epoch * cfg.warmup_epochs, cfg.warmup_ratio)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
        step = 0
        model.train()
        for epoch in range(cfg.warmup_epochs):
            order = [subset[i] for i in torch.randperm(n_warm, generator=g).tolist()]
            lrs = []
            for s in tqdm(range(0, n_warm, bs), desc=f"LESS warm-up epoch {epoch + 1}", disable=not ctx.progress,
                          leave=False):
                lr = cfg.lr * factor(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                self._loss(model, [pool[i] for i in order[s: s + bs]], pad_id, ctx).backward()
                opt.step()
                lrs.append(lr)
                step += 1
            m = torch.cat([opt.state[p]["exp_avg"].flatten().cpu() for p in params])
            v = torch.cat([opt.state[p]["exp_avg_sq"].flatten().cpu() for p in params])
            yield lrs, (m, v)

    def _projected(self, model, params, rows, adam, ctx, desc) -> torch.Tensor:
        """Unit-norm projected (preconditioned when `adam` is given) per-example gradients: [N, proj_dim]."""
        cfg = self.config
        pad_id = pad_id_of(ctx.tokenizer(cfg.model))
        out, pending = [], []
        for i, row in enumerate(tqdm(rows, desc=desc, unit="ex", disable=not ctx.progress, leave=False)):
            model.zero_grad(set_to_none=True)
            self._loss(model, [row], pad_id, ctx).backward()
            g = torch.cat([p.grad.flatten().float().cpu() for p in params])  # [D]
            pending.append(adam_direction(g, *adam, cfg.betas, cfg.eps) if adam is not None else g)
            if len(pending) == cfg.projection_batch or i == len(rows) - 1:
                out.append(project(torch.stack(pending), cfg.proj_dim, cfg.seed))
                pending = []
        z = torch.cat(out)
        return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def identity(self, ctx):
        p = Path(self.config.target)
        target = {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None}
        return {**ctx.model_identity(self.config.model), "target": target}
