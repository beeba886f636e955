"""AdaLoRA: adaptive rank allocation over SVD-form adapters, through HF PEFT (`AdaLoraConfig`).

Zhang et al. 2023, https://arxiv.org/abs/2303.10512. Update rule: W' = W0 + (alpha / r0) P diag(E) Q with
P [out, r0] (lora_B), E [r0] (lora_E), Q [r0, in] (lora_A); the loss adds orth_reg_weight * mean over
matrices of ||P^T P - I||_F, ||Q Q^T - I||_F; every deltaT steps the triplets (P_i, E_i, Q_i) with the
lowest smoothed importance |theta * grad| are masked so the total rank falls cubically from init_r to
target_r per matrix between the warm-up and the final phase.

Defaults: init_r=12 -> target_r=8, beta1=beta2=0.85, orth_reg_weight=0.5 (PEFT's defaults); alpha=24,
so the scale alpha / init_r = 2 matches `lora`'s alpha / r. The schedule is in fractions of the run, so
it scales with its length: the first 10% at the full budget, the last 20% at the final one, a
re-allocation every 10 steps. The total step count comes from the runner (`method.total_steps`, set
before `prepare` by `tunelab.assemble`: `needs_run_length`), else the `total_step` option, else 1000 (with a
warning).

Loop contract: the budget step needs the gradients, so it runs in `after_backward(model, step)`, which
the loop must call after backward (gradients synced) and before clipping and optimizer.step(); without
it `on_step_end` raises (silently unpruned AdaLoRA would be wrong). `after_backward` adds the
orthogonal regulariser's gradient (our objectives pass no labels, so PEFT's forward never adds it) and
runs PEFT's `update_and_allocate(step)` (score, mask); `on_step_end` re-applies the mask after the
optimizer step, so pruned triplets are exactly zero in the weights, as in PEFT's documented order
(allocate after the optimizer step). Importance is scored on the pre-step weights (PEFT: post-step).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from tunelab.methods._peft_common import PeftMethod
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, MethodOptions, register

log = logging.getLogger(__name__)
_STATE = "adalora_state::"  # prefix of the importance EMAs that checkpoints carry with the trainable tensors


class AdaLoRAOptions(MethodOptions):
    init_r: int = Field(12, ge=1, description="Initial rank of every adapted matrix.")
    target_r: int = Field(8, ge=1, description="Average rank per matrix at the end of the budget schedule.")
    alpha: float = Field(24.0, gt=0, description="Scale numerator: the update is alpha / init_r * P E Q.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                           description="Module names (suffixes) to adapt, or 'all-linear'.")
    tinit_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps at the full budget (warm-up).")
    tfinal_ratio: float = Field(0.2, ge=0, lt=1, description="Fraction of steps at the final budget.")
    delta_t: int = Field(10, ge=1, description="Steps between two budget allocations.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of the importance (sensitivity smoothing).")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of the importance's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser.")
    total_step: int | None = Field(None, ge=1, description="Total steps if the runner does not set them.")


@register("adalora", paper="https://arxiv.org/abs/2303.10512")
class AdaLoRA(PeftMethod):
    """SVD-form LoRA whose rank budget is re-allocated by importance during training."""
    trains = "SVD-form adapters P, E, Q whose rank is re-allocated during training"

    Config = AdaLoRAOptions
    capabilities = Capabilities(is_adapter=True, needs_run_length=True)

    def schedule(self) -> tuple[int, int, int]:
        """(total_step, tinit, tfinal) in optimizer steps."""
        total = self.total_steps or self.config.total_step
        if total is None:
            total = 1000
            log.warning("adalora: no total step count (runner did not set method.total_steps); assuming 1000")
        tinit = int(self.config.tinit_ratio * total)
        tfinal = int(self.config.tfinal_ratio * total)
        if tinit >= total - tfinal:
            raise ValueError(f"adalora: tinit_ratio + tfinal_ratio leave no budget phase in {total} steps")
        return total, tinit, tfinal

    def peft_config(self):
        from peft import AdaLoraConfig

        c = self.config
        total, tinit, tfinal = self.schedule()
        return AdaLoraConfig(
            init_r=c.init_r, target_r=c.target_r, lora_alpha=c.alpha, lora_dropout=c.dropout,
            target_modules=c.target_modules, tinit=tinit, tfinal=tfinal, deltaT=c.delta_t, beta1=c.beta1,
            beta2=c.beta2, orth_reg_weight=c.orth_reg_weight, total_step=total, task_type="CAUSAL_LM")

    def __init__(self, config=None):
        super().__init__(config)
        self._model = None  # the PeftModel prepare() returned (its tuner holds the rank allocator)
        self._allocated_step: int | None = None

    def prepare(self, model):
        self._model = super().prepare(model)
        return self._model

    @staticmethod
    def _tuner(model):
        return model.base_model  # peft AdaLoraModel: .model is the transformer, .rankallocator the budget

    # -- hooks of the training loop ----------------------------------------------------------------
    def orth_regulariser(self, model) -> torch.Tensor:
        """Mean over adapted matrices of ||Q Q^T - I||_F (lora_A [r, in]) and ||P^T P - I||_F (lora_B [out, r])."""
        terms = []
        for name, p in self._tuner(model).model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in name else p.T @ p  # [r, r]
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device), "fro"))
        return torch.stack(terms).mean()

    def after_backward(self, model, step: int) -> None:
        """After backward, before clip + optimizer.step: add the regulariser's gradient, score, allocate."""
        w = self.config.orth_reg_weight
        if w > 0:
            params = [p for n, p in self._tuner(model).model.named_parameters()
                      if ("lora_A" in n or "lora_B" in n) and p.requires_grad]
            # torch.autograd.grad, not .backward(): no DDP reducer hook fires outside its forward/backward
            grads = torch.autograd.grad(w * self.orth_regulariser(model), params)
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._tuner(model).update_and_allocate(step)
        self._allocated_step = step

    def on_step_end(self, model, step, optimizer) -> None:
        """Re-apply this step's mask after the optimizer moved the weights: pruned triplets stay exactly 0."""
        if self._allocated_step != step:
            raise RuntimeError("adalora: the training loop did not call method.after_backward(model, step) before "
                               "the optimizer step; without it no rank is allocated and no regulariser applies")
        tuner = self._tuner(model)
        cfg = tuner.peft_config[tuner.trainable_adapter_name]
        _, masked_now = tuner.rankallocator.budget_schedule(step)
        if cfg.rank_pattern and (masked_now or step >= cfg.total_step - cfg.tfinal):
            tuner.rankallocator.mask_using_rank_pattern(tuner.model, cfg.rank_pattern)

    # -- checkpoints: the importance EMAs (tensors) and the rank pattern (JSON) --------------------
    def trainable_state_dict(self, model):
        state = super().trainable_state_dict(model)
        alloc = self._tuner(model).rankallocator
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):  # PEFT resets the EMAs of a name missing from ipt
            for n, t in getattr(alloc, kind).items():
                state[f"{_STATE}{kind}::{n}"] = t.detach()
        return state

    def load_trainable_state_dict(self, model, state):
        alloc = self._tuner(model).rankallocator
        for key in [k for k in state if k.startswith(_STATE)]:
            kind, n = key[len(_STATE):].split("::", 1)
            getattr(alloc, kind)[n] = state[key].clone()
        super().load_trainable_state_dict(model, {k: v for k, v in state.items() if not k.startswith(_STATE)})

    def state_dict(self):
        if self._model is None:
            return {}
        tuner = self._tuner(self._model)
        return {"rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern}

    def load_state_dict(self, state):
        if self._model is not None and state.get("rank_pattern") is not None:
            tuner = self._tuner(self._model)
            tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]
