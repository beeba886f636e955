"""`gradient`: LESS, influence of each example on a small target set through LoRA gradients.

Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning",
https://arxiv.org/abs/2402.04333. Steps, as in the paper:
  1. warm-up: a LoRA adapter is trained for `warmup_steps` AdamW steps on random pool examples, which gives
     Adam's moment estimates m, v (and non-zero LoRA B matrices: at B = 0 the gradient w.r.t. A vanishes);
  2. each pool example's gradient g of its mean response loss w.r.t. the LoRA parameters [D] is turned into
     Adam's update direction  (b1 m + (1-b1) g) / (sqrt(b2 v + (1-b2) g^2) + eps);
     each target example keeps its plain gradient (LESS uses SGD gradients for the target set);
  3. both are projected to `proj_dim` dimensions by one random Rademacher matrix R [D, d] (entries +-1/sqrt(d):
     inner products preserved in expectation, Johnson-Lindenstrauss) and normalised;
  4. the score is the cosine similarity to the target gradients, averaged over the target examples
     (`aggregate: mean`, LESS's per-task mean) or their maximum.
R is never stored whole: chunks of its rows are regenerated from a seed for each batch of gradients.
One forward + backward per example, so this is the slowest scorer (LESS reports the same); on CPU keep the
adapter small (defaults: r=8 on q_proj, v_proj).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from tunelab.selection.lm import _pad, pad_id_of, response_input
from tunelab.selection.registry import ScoreOutput, Scorer, as_chat, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions
from tunelab.core.precision import autocast_context

ROWS_PER_CHUNK = 1 << 16  # rows of R generated at once: [65536, d] int8 -> float


class GradientOptions(LMScorerOptions):
    target: str = Field(..., description="File of target-task examples (any supported data format).")
    target_n: int | None = Field(None, ge=1, description="Use the first n target examples.")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    warmup_steps: int = Field(8, ge=1, description="AdamW steps of the warm-up adapter (gives Adam's m and v).")
    warmup_batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0, description="Warm-up learning rate.")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    proj_dim: int = Field(1024, ge=8, description="Dimension d of the random projection (LESS: 8192).")
    projection_batch: int = Field(64, ge=1, description="Gradients projected together (R chunks regenerated per batch).")
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
    """The update direction Adam would take with this gradient: LESS's preconditioned training gradient."""
    m1 = betas[0] * m + (1 - betas[0]) * g
    v1 = betas[1] * v + (1 - betas[1]) * g * g
    return m1 / (v1.sqrt() + eps)


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
        m, v = self._warmup(model, params, pool, pad_id_of(tok), ctx)
        model.eval()
        t = self._projected(model, params, [encode(ex) for ex in target], None, ctx, "LESS target")
        x = self._projected(model, params, pool, (m, v), ctx, "LESS pool")
        sims = x @ t.T  # [N, n_target] cosine similarities (rows unit-norm)
        values = sims.mean(1) if cfg.aggregate == "mean" else sims.max(1).values
        return ScoreOutput(values.double().numpy())

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
        cfg = self.config
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
        g = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for _ in tqdm(range(cfg.warmup_steps), desc="LESS warm-up", disable=not ctx.progress, leave=False):
            idx = torch.randint(0, len(pool), (min(cfg.warmup_batch_size, len(pool)),), generator=g).tolist()
            opt.zero_grad(set_to_none=True)
            self._loss(model, [pool[i] for i in idx], pad_id, ctx).backward()
            opt.step()
        m = torch.cat([opt.state[p]["exp_avg"].flatten().cpu() for p in params])
        v = torch.cat([opt.state[p]["exp_avg_sq"].flatten().cpu() for p in params])
        return m, v

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
