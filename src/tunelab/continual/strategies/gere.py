"""GeRe: general samples replay — a fixed small set of general texts replayed at every training step.

Zhang et al. 2025, "GeRe: Towards Efficient Anti-Forgetting in Continual Learning of LLM via General Samples
Replay", https://arxiv.org/abs/2508.04676 (code: github.com/Qznan/GeRe). The set is the first
`n_samples` x `max_tokens` tokens of a general text file (`texts`), cut into `n_samples` rows of `max_tokens`
tokens. Before any training the base model's last hidden states on it are recorded once (h0 [N, L, d]),
with per-dimension statistics over all its tokens: mu, sigma [d]. Every training micro-batch then runs the
model on the next `batch_size` rows (cycling) and adds the selected terms, each weighted (`losses`):

  ce   next-token cross-entropy on the general rows (token mean)                   "vanilla label fitting"
  kl   T^2 KL(p_base || p_model) over every position (token mean; the base runs alongside: the adapter
       disabled for PEFT models, else a frozen copy of the base)                    "logit imitation"
  l1   mean |h - h0|,  l2  mean (h - h0)^2 over the last hidden states               "feature imitation"
  tm   threshold-based margin: with thresholds mu +- sigma, each (token, dimension) of h0 is negative
       (h0 <= mu - sigma), positive (h0 >= mu + sigma) or neutral; the model's h is penalised for leaving
       that state: relu(h - (mu - sigma)) for negative, relu((mu + sigma) - h) for positive, relu(h - (mu +
       sigma)) + relu((mu - sigma) - h) for neutral; the loss is the sum of violations divided by the number
       of violating entries (the authors' normalisation). Zero at the start of training.
Default {ce: 1, tm: 200}: the paper's method with the authors' default margin weight. Their trainer
(github.com/Qznan/GeRe, `GeReTrainer.compute_loss`, `w_strategy='100'`) minimises

  L_authors = (CE_task + CE_gere) / 2 + 100 * TM,

the two cross-entropies AVERAGED. Strategy terms are ADDED to the task's mean loss (StrategyObjective), so
the same objective here is CE_task + 1 * CE_gere + 200 * TM = 2 * L_authors: equal up to a factor 2, which
AdamW ignores (up to eps and gradient clipping; halve `train.lr` under SGD). {ce: 1, tm: 100} would be the
authors' margin weight 50. Their `w_strategy: dy` (TM weighted by CE / TM each step) is not offered.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.continual.strategies.base import (
    Strategy,
    StrategyError,
    StrategyOptions,
    is_peft,
    register_strategy,
    unwrap,
)

LossName = Literal["ce", "kl", "l1", "l2", "tm"]


def tm_thresholds(h0: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative threshold mu - sigma, positive threshold mu + sigma), each [d], from h0 [N, L, d] over the
    tokens where mask [N, L] is true (population std, as the authors' running sums)."""
    flat = h0.reshape(-1, h0.size(-1)).float() if mask is None else h0[mask.bool()].float()  # [M, d]
    mu = flat.mean(0)
    sigma = (flat.pow(2).mean(0) - mu.pow(2)).clamp(min=0).sqrt()
    return mu - sigma, mu + sigma


def tm_loss(h: torch.Tensor, h0: torch.Tensor, neg_thr: torch.Tensor, pos_thr: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Threshold-based margin loss. h, h0 [B, L, d]; thresholds [d]; mask [B, L] (1 = real token)."""
    h = h.float()
    neg, pos = h0 <= neg_thr, h0 >= pos_thr  # [B, L, d] states of the base
    neu = ~(neg | pos)
    margin = (neg * F.relu(h - neg_thr) + pos * F.relu(pos_thr - h)
              + neu * (F.relu(h - pos_thr) + F.relu(neg_thr - h)))  # [B, L, d]
    if mask is not None:
        margin = margin * mask[..., None]
    return margin.sum() / ((margin != 0).sum() + 1e-8)


@register_strategy("gere", paper="https://arxiv.org/abs/2508.04676")
class GeRe(Strategy):
    """A fixed set of general texts replayed every step (CE, KL, L1/L2 features or threshold-margin loss)."""

    class Config(StrategyOptions):
        texts: str = Field(..., description="General text file (.txt/.raw, or JSONL with `text`).")
        n_samples: int = Field(64, ge=1, description="Rows of general text in the fixed set.")
        max_tokens: int = Field(128, ge=8, description="Tokens per row.")
        batch_size: int = Field(4, ge=1, description="General rows run with every training micro-batch.")
        losses: dict[LossName, float] = Field(default_factory=lambda: {"ce": 1.0, "tm": 200.0},
                                              description="Terms and their weights (default: the authors' "
                                                          "(CE_task + CE_gere)/2 + 100 TM, times 2).")
        kl_temperature: float = Field(2.0, gt=0, description="Temperature of the kl term (the authors' 2).")

    def __init__(self, config=None):
        super().__init__(config)
        self.ids: torch.Tensor | None = None  # [N, L]
        self.h0: torch.Tensor | None = None  # [N, L, d] base hidden states
        self.neg_thr = self.pos_thr = None  # [d]
        self.cursor = 0
        self.base_copy = None

    def check(self, ctx):
        from tunelab.evaluate.perplexity import load_text

        try:
            load_text(self.config.texts, max_chars=1000)
        except Exception as e:  # noqa: BLE001 - re-raised with the field named
            raise StrategyError(f"strategy gere: texts: {e}") from None
        if not self.config.losses:
            raise StrategyError("strategy gere: `losses` is empty")

    def _rows(self, tokenizer) -> torch.Tensor:
        from tunelab.evaluate.perplexity import load_text

        need = self.config.n_samples * self.config.max_tokens
        text = load_text(self.config.texts, max_chars=need * 12)  # ~4 characters per token, with margin
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // self.config.max_tokens
        if n < 1:
            raise StrategyError(f"strategy gere: {self.config.texts} has fewer than {self.config.max_tokens} tokens")
        n = min(n, self.config.n_samples)
        return torch.tensor(ids[: n * self.config.max_tokens]).view(n, self.config.max_tokens)

    def setup(self, ctx, model):
        """Record the base model's hidden states on the fixed set (the model is still the base here)."""
        from tunelab.core.precision import autocast_context

        self.ids = self._rows(ctx.tokenizer)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        hs = []
        with torch.no_grad(), autocast_context(device, ctx.precision):
            for i in range(0, len(self.ids), self.config.batch_size):
                out = model(input_ids=self.ids[i: i + self.config.batch_size].to(device), output_hidden_states=True,
                            use_cache=False)
                hs.append(out.hidden_states[-1].float().cpu())  # [b, L, d]
        model.train(was_training)
        self.h0 = torch.cat(hs)
        self.neg_thr, self.pos_thr = tm_thresholds(self.h0)
        if "kl" in self.config.losses and not is_peft(model):
            self.base_copy = copy.deepcopy(unwrap(model)).eval()
            for p in self.base_copy.parameters():
                p.requires_grad_(False)

    def _base_logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.base_copy is not None:
                return self.base_copy(input_ids=ids, use_cache=False).logits
            peft_model = unwrap(model)
            was_training = peft_model.training
            peft_model.eval()
            try:
                with peft_model.disable_adapter():
                    return peft_model(input_ids=ids, use_cache=False).logits
            finally:
                peft_model.train(was_training)

    def loss_terms(self, model, batch):
        if self.ids is None:
            raise StrategyError("strategy gere: setup() was not called")
        from tunelab.objectives.distill import token_kl

        n, bs = len(self.ids), min(self.config.batch_size, len(self.ids))
        rows = [(self.cursor + k) % n for k in range(bs)]
        self.cursor = (self.cursor + bs) % n
        device = next(model.parameters()).device
        ids = self.ids[rows].to(device)  # [b, L]
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        logits, h = out.logits, out.hidden_states[-1]  # [b, L, V], [b, L, d]
        w, terms = self.config.losses, {}
        if "ce" in w:
            terms["ce"] = w["ce"] * F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                    ids[:, 1:].reshape(-1))
        if "kl" in w:
            base = self._base_logits(model, ids)
            v = min(logits.size(-1), base.size(-1))
            terms["kl"] = w["kl"] * token_kl(logits[..., :v], base[..., :v], None,
                                             temperature=self.config.kl_temperature).mean()
        h0 = self.h0[rows].to(device)
        if "l1" in w:
            terms["l1"] = w["l1"] * (h.float() - h0).abs().mean()
        if "l2" in w:
            terms["l2"] = w["l2"] * (h.float() - h0).pow(2).mean()
        if "tm" in w:
            terms["tm"] = w["tm"] * tm_loss(h, h0, self.neg_thr.to(device), self.pos_thr.to(device))
        return terms

    def state(self):
        return {}, {"cursor": self.cursor}

    def load_state(self, tensors, meta, model):
        self.cursor = int(meta.get("cursor", 0))
