"""I-LoRA: interpolation-based LoRA, a dual-memory experience replay. A fast learner trains as usual, a slow
learner is its exponential moving average, and on replayed examples the fast learner's hidden states are held
to the slow one's.

Ren et al. 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning",
https://arxiv.org/abs/2402.18865; reference code github.com/which47/LLMCL (`method/ILORA.py`). As there:
  memory      every training micro-batch is offered to a reservoir buffer (`buffer_size` 500 rows, Algorithm
              R, the current task's rows included); from the second task on, each micro-batch is joined by as
              many rows sampled from the buffer;
  slow        after every optimizer step t (counted within the stage),
                  theta_slow <- l_t theta_slow + (1 - l_t) theta_fast,   l_t = min(1 - 1/(t + 1), decay)
              (`decay` 0.25, the code's `ema_alpha`; theta_slow starts at theta_fast);
  loss        on the replayed rows, with h^k the hidden states of every layer k (embeddings included) of the
              fast (with gradient) and the slow learner (without),
                  L_cons = mean_(k, tokens, dims) (h_fast - max(h_fast, h_slow))^2   (only where h_fast < h_slow)
              and the code's total is (L_task + L_replay) / 2 + w L_cons, L_replay the fast learner's CE on the
              replayed rows. Strategy terms are ADDED to the task's mean loss, so the terms here are
              `replay` = L_replay and `consistency` = 2 w L_cons: twice the code's total (AdamW ignores the
              factor, up to eps and clipping). In the first task (no replay) the loss is the task's alone.
The slow learner's states come from `torch.func.functional_call` with the slow tensors, so the fast weights
are never swapped out. Departure: pads are masked out of L_cons and L_replay (the code left-pads with token 0
and averages over everything). Which learner is evaluated and exported (`infer_with`): the slow one by default,
as tunelab did before; the reference code saves the fast ('default') adapter after each task (`fast`).
Works on any method's trainable parameters (LoRA: a slow adapter; full fine-tuning: a slow copy of the model).
"""

from __future__ import annotations

import contextlib
import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyOptions, register_strategy, trainable_params, unwrap
from tunelab.continual.strategies.replay import reservoir_add
from tunelab.core.constants import IGNORE_INDEX


def ema_update(slow: dict[str, torch.Tensor], fast: dict[str, torch.Tensor], decay: float) -> None:
    """slow <- decay * slow + (1 - decay) * fast, in place (fp32); names missing from `slow` start at fast."""
    with torch.no_grad():
        for n, p in fast.items():
            if n not in slow:
                slow[n] = p.detach().float().clone()
            else:
                slow[n].mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)


def ema_decay(step: int, decay: float) -> float:
    """The code's `update_ema_weights`: min(1 - 1/(step + 1), decay), step counted from 1 within a stage."""
    return min(1.0 - 1.0 / (step + 1), decay)


def consistency_loss(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...],
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """I-LoRA's L_cons: mean over layers, real tokens and dims of (h_fast - max(h_fast, h_slow))^2, i.e. MSE of
    the fast states against where(h_fast > h_slow, h_fast, h_slow). fast/slow: per layer [B, T, d]; mask [B, T]."""
    per = []
    for hf, hs in zip(fast, slow):
        hf = hf.float()
        err = (hf - torch.maximum(hf, hs.float().detach())).pow(2)  # [B, T, d], zero where h_fast >= h_slow
        per.append(err[mask.bool()] if mask is not None else err.reshape(-1, err.size(-1)))
    return torch.cat(per).mean()


@register_strategy("ilora", paper="https://arxiv.org/abs/2402.18865")
class ILoRA(Strategy):
    """Fast + slow (EMA) learners, a replay buffer and a consistency loss on the replayed rows' hidden states."""

    class Config(StrategyOptions):
        decay: float = Field(0.25, ge=0, lt=1, description="EMA coefficient of the slow learner (the code's 0.25).")
        consistency_weight: float = Field(1.0, ge=0, description="w of the consistency loss (the code's reg_weight).")
        buffer_size: int = Field(500, ge=1, description="Rows in the reservoir replay buffer (the code's 500).")
        infer_with: Literal["slow", "fast"] = Field("slow", description="Learner evaluated and exported.")
        seed: int = Field(0, description="Seed of the reservoir and of the replay sampling.")

    def __init__(self, config=None):
        super().__init__(config)
        self.slow: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.buffer: list[tuple[list[int], list[int]]] = []  # (input ids, labels) of real tokens
        self.n_seen = 0
        self.stage = 0
        self.pad_id = 0
        self.rng = random.Random(self.config.seed)

    def setup(self, ctx, model):
        self.pad_id = int(ctx.pad_id or 0)

    def before_stage(self, ctx, model, stage):
        self.stage = stage
        self.params = trainable_params(model)
        if not self.slow:
            ema_update(self.slow, self.params, self.config.decay)  # starts equal to the fast weights

    def on_step(self, model, step):
        ema_update(self.slow, self.params, ema_decay(step, self.config.decay))

    # -- replay and the consistency loss ------------------------------------------------------------
    def _offer(self, batch) -> None:
        ids, lab = batch["input_ids"], batch["labels"]
        att = batch.get("attention_mask", torch.ones_like(ids))
        rows = [(ids[i][att[i].bool()].tolist(), lab[i][att[i].bool()].tolist()) for i in range(ids.size(0))]
        self.n_seen = reservoir_add(self.buffer, self.n_seen, rows, self.config.buffer_size, self.rng)

    def _replay_batch(self, n: int, device) -> dict[str, torch.Tensor]:
        rows = [self.buffer[i] for i in self.rng.sample(range(len(self.buffer)), min(n, len(self.buffer)))]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)], lab[i, : len(y)], att[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids.to(device), "labels": lab.to(device), "attention_mask": att.to(device)}

    def loss_terms(self, model, batch):
        if "labels" not in batch:  # preference batches: nothing to replay in the code's form
            return {}
        n = batch["input_ids"].size(0)
        self._offer(batch)  # as the code: the batch enters the buffer before the forward
        if self.stage == 0 or not self.buffer:
            return {}
        replay = self._replay_batch(n, batch["input_ids"].device)
        self.last_replay = replay
        inputs = {"input_ids": replay["input_ids"], "attention_mask": replay["attention_mask"]}
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        logits, labels = out.logits[:, :-1].float(), replay["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        base = unwrap(model)
        named = dict(base.named_parameters())
        slow = {k: v.to(device=named[k].device, dtype=named[k].dtype) for k, v in self.slow.items() if k in named}
        with torch.no_grad():
            slow_out = torch.func.functional_call(base, slow, args=(), kwargs={**inputs, "output_hidden_states": True,
                                                                               "use_cache": False})
        cons = consistency_loss(out.hidden_states, slow_out.hidden_states, replay["attention_mask"])
        return {"replay": ce, "consistency": 2.0 * self.config.consistency_weight * cons}

    # -- evaluation, export, state --------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_weights(self, model):
        if self.config.infer_with == "fast":
            yield
            return
        params = {n: p for n, p in model.named_parameters() if n in self.slow}
        fast = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.slow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(fast[n])

    def finish(self, ctx, model):
        if self.config.infer_with == "fast":
            return
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.slow:
                    p.copy_(self.slow[n].to(p.dtype))

    def state(self):
        meta = {"buffer": [[x, y] for x, y in self.buffer], "n_seen": self.n_seen,
                "rng": [list(s) if isinstance(s, tuple) else s for s in self.rng.getstate()]}
        return dict(self.slow), meta

    def load_state(self, tensors, meta, model):
        self.slow = {n: t.float().clone() for n, t in tensors.items()}
        self.buffer = [(list(x), list(y)) for x, y in meta.get("buffer", [])]
        self.n_seen = int(meta.get("n_seen", len(self.buffer)))
        if "rng" in meta:
            version, internal, gauss = meta["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
