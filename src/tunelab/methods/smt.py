"""SMT: sparse matrix tuning. Full fine-tuning for a warm-up, then only the sub-matrix blocks with the largest
warm-up gradients train.

He et al. 2024, "SMT: Fine-Tuning Large Language Models with Sparse Matrices", https://arxiv.org/abs/2405.15525
(ICLR 2025); reference code github.com/HectorHHZ/Sparse_Matrix_Tuning (`deepspeed/fine_tune.py`,
`smt/smt_helper.py`). Update rule, as there:
  1. warm-up: `warmup_steps` (100) steps of full fine-tuning of the whole model, while the gradients of the
     attention matrices (q, k, v) (and, with `mlp_ratio`, the MLP's gate/up/down) are summed: G = sum_t g_t;
  2. selection: each targeted matrix is cut into `block_size` x `block_size` (256) sub-matrices; every block is
     scored by |mean(G_block)| (`score: mean_abs`, the code's default; `abs_mean` = mean |G_block|) and the
     n = int(ratio * B) best blocks over ALL targeted attention matrices are kept (one global ranking,
     "no_restriction"), B being the number of 256-blocks of every 2-D tensor of the model (the code's count,
     embeddings included); attention and MLP have separate budgets (`attention_ratio`, `mlp_ratio`);
  3. then only the selected blocks train: W <- W - AdamW step restricted to the blocks (a masked AdamW: the
     other entries, and every other tensor, stay fixed), with fresh optimizer moments (the code builds a new
     Adam at the switch).
Defaults: the code's (`downsample_attention_blocks_ratio` 0.0084, MLP off, `calculate_strategy` mean_abs,
256 x 256 blocks) with the README's 100 warm-up steps. Edge blocks of a matrix whose sides are not multiples of
the block size are smaller (the code requires multiples of 256); on SmolLM2 (width 576) a 256-block is large,
`block_size: 64` gives finer choices. Departures: the run's learning-rate schedule continues through the switch
(the code starts a new one) and AdamW keeps `train.betas` (the code switches to betas 0.95, 0.999).
The block selection is saved in `state_dict()` (block ids per matrix); the warm-up's gradient sums travel with
the checkpoint's tensors (`smt_grad_sum.<name>`), so a resume during the warm-up is exact too.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from tunelab.methods._modules import reset_optimizer_state
from tunelab.methods.gmt import MaskedAdamW
from tunelab.methods.registry import Method, MethodOptions, register

SUM_PREFIX = "smt_grad_sum."


def block_scores(grad: torch.Tensor, block: int, score: str = "mean_abs") -> torch.Tensor:
    """Score of each block x block sub-matrix of grad [out, in] -> [ceil(out/b), ceil(in/b)]: |mean(g)|
    (`mean_abs`, SMT's default) or mean(|g|) (`abs_mean`); edge blocks average their own entries."""
    g = grad.detach().float()
    g = (g.abs() if score == "abs_mean" else g)[None, None]  # [1, 1, out, in]
    pooled = torch.nn.functional.avg_pool2d(g, block, stride=block, ceil_mode=True)[0, 0]
    return pooled.abs() if score == "mean_abs" else pooled


def blocks_to_mask(block_ids: list[int], shape: torch.Size, block: int, device=None) -> torch.Tensor:
    """Entry mask [out, in] of the blocks with flat ids `block_ids` in the [ceil(out/b), ceil(in/b)] grid."""
    rows, cols = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    grid = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    grid[torch.tensor(block_ids, dtype=torch.long, device=device)] = True
    grid = grid.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return grid[: shape[0], : shape[1]].contiguous()


def total_blocks(model: torch.nn.Module, block: int) -> float:
    """SMT's denominator: sum over every 2-D parameter of (rows / b) * (cols / b) (fractional, as its code)."""
    return sum(p.shape[0] / block * p.shape[1] / block for p in model.parameters() if p.ndim == 2)


def select_blocks(sums: dict[str, torch.Tensor], n: int, block: int, score: str) -> dict[str, list[int]]:
    """The n best blocks over all matrices in `sums` (one global ranking): {name: sorted flat block ids}."""
    scored = [(name, block_scores(g, block, score).flatten()) for name, g in sums.items()]
    flat = torch.cat([s for _, s in scored])
    keep = torch.topk(flat, min(n, flat.numel())).indices.tolist()
    out: dict[str, list[int]] = {name: [] for name, _ in scored}
    offsets, start = [], 0
    for name, s in scored:
        offsets.append((start, start + s.numel(), name))
        start += s.numel()
    for k in keep:
        for a, b, name in offsets:
            if a <= k < b:
                out[name].append(k - a)
                break
    return {name: sorted(ids) for name, ids in out.items() if ids}


@register("smt", paper="https://arxiv.org/abs/2405.15525")
class SMT(Method):
    trains = "the whole model for a warm-up, then the attention blocks with the largest warm-up gradients"

    class Config(MethodOptions):
        block_size: int = Field(256, ge=1, description="Side of the sub-matrices (the paper's 256).")
        attention_ratio: float = Field(0.0084, ge=0, le=1, description="Attention blocks kept, as a fraction of all "
                                                                       "2-D blocks of the model.")
        mlp_ratio: float = Field(0.0, ge=0, le=1, description="MLP blocks kept, likewise (0: MLP frozen).")
        attention_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
                                             description="Attention linears (name suffixes) whose blocks compete.")
        mlp_modules: list[str] = Field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
                                       description="MLP linears (name suffixes) whose blocks compete (mlp_ratio).")
        warmup_steps: int = Field(100, ge=0, description="Full fine-tuning steps whose gradients select the "
                                                         "blocks (0: the first step's gradient).")
        score: Literal["mean_abs", "abs_mean"] = Field("mean_abs", description="Block score: |mean g| or mean |g|.")

    def __init__(self, config=None):
        super().__init__(config)
        self.blocks: dict[str, list[int]] = {}  # selected block ids per matrix name (after the warm-up)
        self.sums: dict[str, torch.Tensor] = {}  # warm-up gradient sums per targeted matrix [out, in] fp32
        self.step = 0  # optimizer steps completed

    def prepare(self, model):
        c = self.config
        self._model = model
        self._kind: dict[str, str] = {}  # targeted matrix name -> "attention" | "mlp"
        for mod_name, mod in model.named_modules():
            leaf = mod_name.split(".")[-1]
            if isinstance(mod, torch.nn.Linear):
                if c.attention_ratio > 0 and leaf in c.attention_modules:
                    self._kind[f"{mod_name}.weight"] = "attention"
                elif c.mlp_ratio > 0 and leaf in c.mlp_modules:
                    self._kind[f"{mod_name}.weight"] = "mlp"
        if not self._kind:
            raise ValueError("method smt: no targeted matrix (check attention_ratio / mlp_ratio and the modules)")
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._total = total_blocks(model, c.block_size)
        model.requires_grad_(True)  # the warm-up is full fine-tuning
        if self.blocks:
            self._freeze(model)
        return model

    @property
    def selected(self) -> bool:
        return bool(self.blocks)

    def _freeze(self, model) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(n in self.blocks)

    def _select_now(self, optimizer) -> None:
        c = self.config
        for kind, ratio in (("attention", c.attention_ratio), ("mlp", c.mlp_ratio)):
            sums = {n: g for n, g in self.sums.items() if self._kind[n] == kind}
            if ratio > 0 and sums:
                self.blocks.update(select_blocks(sums, max(1, int(ratio * self._total)), c.block_size, c.score))
        self.sums = {}
        params = dict(self._model.named_parameters())
        frozen = [p for n, p in params.items() if n not in self.blocks]
        for p in frozen:
            p.grad = None  # this step no longer updates them
        opt = getattr(optimizer, "optimizer", optimizer)
        for p in frozen:
            opt.state.pop(p, None)  # their moments are freed
        reset_optimizer_state(optimizer, [params[n] for n in self.blocks])  # fresh moments, as the code's new Adam
        self._freeze(self._model)

    def _masks(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """MaskedAdamW's selector: dense during the warm-up (accumulating G), the blocks afterwards."""
        c = self.config
        if not self.selected:
            for p, g in zip(params, grads):
                name = self._names[id(p)]
                if name in self._kind:
                    self.sums[name] = self.sums.get(name, 0) + g.detach().float()
            if self.step + 1 >= max(c.warmup_steps, 1):  # the last warm-up step's update is still full
                self._pending = True
            return [None] * len(params)
        return [blocks_to_mask(self.blocks[self._names[id(p)]], p.shape, c.block_size, p.device) for p in params]

    def build_optimizer(self, model, train_config):
        groups = self.param_groups(model, train_config.weight_decay)
        self._pending = False
        opt = MaskedAdamW([g for g in groups if g["params"]], lr=train_config.lr, betas=train_config.betas,
                          weight_decay=train_config.weight_decay, select=self._masks)

        def select_before(optimizer, args, kwargs):  # warmup_steps = 0: select from the first step's gradient
            if not self.selected and self.config.warmup_steps == 0:
                for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is not None):
                    if self._names[id(p)] in self._kind:
                        self.sums[self._names[id(p)]] = p.grad.detach().float().clone()
                self._select_now(optimizer)

        def select_after(optimizer, args, kwargs):  # after the last warm-up step: select, freeze, fresh moments
            if self._pending:
                self._pending = False
                self._select_now(optimizer)

        opt.register_step_pre_hook(select_before)
        opt.register_step_post_hook(select_after)
        return opt

    def on_step_end(self, model, step: int, optimizer) -> None:
        self.step = step

    def trainable_state_dict(self, model) -> dict[str, torch.Tensor]:
        # every parameter: the warm-up changed them all, frozen or not afterwards
        out = {n: p.detach() for n, p in model.named_parameters()}
        out.update({SUM_PREFIX + n: g for n, g in self.sums.items()})  # the warm-up's sums so far
        return out

    def load_trainable_state_dict(self, model, state) -> None:
        self.sums = {k[len(SUM_PREFIX):]: v.float().clone() for k, v in state.items() if k.startswith(SUM_PREFIX)}
        super().load_trainable_state_dict(model, {k: v for k, v in state.items() if not k.startswith(SUM_PREFIX)})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "blocks": self.blocks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.step = int(state.get("step", 0))
            self.blocks = {k: [int(i) for i in v] for k, v in state.get("blocks", {}).items()}
            if self.blocks and getattr(self, "_model", None) is not None:
                self._freeze(self._model)
