"""I-LoRA: interpolation-based LoRA — a fast learner trained as usual and a slow learner that is its
exponential moving average; the slow one is what is evaluated and exported.

Ren et al. 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning",
https://arxiv.org/abs/2402.18865. After every optimizer step, for every trainable parameter:

  theta_slow <- decay * theta_slow + (1 - decay) * theta_fast        (theta_slow starts at theta_fast)
Implemented here: the two learners and the interpolation; the slow weights are swapped in for every
evaluation and kept at the end. The paper also replays a memory buffer with a consistency loss between the
two learners' hidden states; combine with `replay` for the buffer (the consistency term is not implemented).
Works on any method's trainable parameters (LoRA: a slow adapter; full fine-tuning: a slow copy of the model).
"""

from __future__ import annotations

import contextlib

import torch
from pydantic import Field

from tunelab.continual.strategies.base import Strategy, StrategyOptions, register_strategy, trainable_params


def ema_update(slow: dict[str, torch.Tensor], fast: dict[str, torch.Tensor], decay: float) -> None:
    """slow <- decay * slow + (1 - decay) * fast, in place (fp32); names missing from `slow` start at fast."""
    with torch.no_grad():
        for n, p in fast.items():
            if n not in slow:
                slow[n] = p.detach().float().clone()
            else:
                slow[n].mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)


@register_strategy("ilora", paper="https://arxiv.org/abs/2402.18865")
class ILoRA(Strategy):
    """Slow learner = EMA of the fast (trained) weights; the slow one is evaluated and exported."""

    class Config(StrategyOptions):
        decay: float = Field(0.99, ge=0, lt=1, description="EMA coefficient of the slow learner.")

    def __init__(self, config=None):
        super().__init__(config)
        self.slow: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def before_stage(self, ctx, model, stage):
        self.params = trainable_params(model)
        if not self.slow:
            ema_update(self.slow, self.params, self.config.decay)  # starts equal to the fast weights

    def on_step(self, model, step):
        ema_update(self.slow, self.params, self.config.decay)

    @contextlib.contextmanager
    def eval_weights(self, model):
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
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.slow:
                    p.copy_(self.slow[n].to(p.dtype))

    def state(self):
        return dict(self.slow), {}

    def load_state(self, tensors, meta, model):
        self.slow = {n: t.float().clone() for n, t in tensors.items()}
