"""DiaBlo: train only the diagonal blocks of the targeted weight matrices.

Gurses et al. 2025, "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning", https://arxiv.org/abs/2506.03230.
Update rule: y = W x + blockdiag(D_1, ..., D_N) x with W [out, in] frozen and D [N, out/N, in/N] trained
(zero init, so the model starts unchanged); merge: W' = W + blockdiag(D).

No low-rank product: D gets the gradient of its blocks of W directly, so there is no LoRA-style
initialisation or scaling to tune. Per matrix: out * in / N parameters.
Defaults: N = 32 blocks on the seven linears of attention and MLP. 32 divides every dimension of the common
small models (SmolLM2-135M: 576, 192, 1536; Llama: 4096, 11008 ...), and gives SmolLM2-135M about 10k
parameters per 576x576 matrix, the size of LoRA r~9 there (the paper picks N to match LoRA budgets).
out and in must both be divisible by N (an error names the linear otherwise).
Export: merged = plain linears with W + blockdiag(D); adapter = D in tunelab's own format (PEFT cannot load it).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.methods._modules import FoldableWrapper, OwnAdapterMixin, fold_wrappers, target_linears, wrap_targets
from tunelab.methods.lora import DEFAULT_TARGETS
from tunelab.methods.registry import Capabilities, Method, MethodOptions, register


class DiaBloLinear(FoldableWrapper):
    """y = base(x) + blockdiag(D) x."""

    def __init__(self, base: torch.nn.Linear, num_blocks: int):
        super().__init__(base)
        n, o, i = num_blocks, base.out_features, base.in_features
        # D [N, out/N, in/N]: block k maps input slice k to output slice k
        self.diablo_blocks = torch.nn.Parameter(torch.zeros(n, o // n, i // n, dtype=base.weight.dtype,
                                                            device=base.weight.device))

    def forward(self, x):
        y = self.base(x)  # [..., out]
        n, ob, ib = self.diablo_blocks.shape
        xb = x.reshape(*x.shape[:-1], n, ib)  # [..., N, in/N]
        d = torch.einsum("...ni,noi->...no", xb, self.diablo_blocks.to(xb.dtype))  # [..., N, out/N]
        return y + d.reshape(*x.shape[:-1], n * ob).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """blockdiag(D) [out, in]."""
        return torch.block_diag(*self.diablo_blocks.unbind(0))

    @torch.no_grad()
    def fold(self) -> torch.nn.Linear:
        b = self.base
        out = torch.nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, dtype=b.weight.dtype,
                              device=b.weight.device)
        out.weight.copy_(b.weight + self.delta().to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        out.requires_grad_(False)
        return out


class DiaBloOptions(MethodOptions):
    num_blocks: int = Field(32, ge=1, description="N: diagonal blocks per matrix (must divide out and in).")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Linears (name suffixes, or 'all-linear') whose diagonal blocks train.",
    )


@register("diablo", paper="https://arxiv.org/abs/2506.03230")
class DiaBlo(OwnAdapterMixin, Method):
    capabilities = Capabilities(supports_sharding=True)  # tests/train/test_sharded_methods.py
    trains = "diagonal blocks added to the targeted weight matrices"
    Config = DiaBloOptions

    def prepare(self, model):
        n = self.config.num_blocks
        model.requires_grad_(False)
        targets = target_linears(model, self.config.target_modules, method=self.name)
        for name, lin in targets:
            if lin.out_features % n or lin.in_features % n:
                raise ValueError(f"method diablo: num_blocks={n} must divide both dimensions of {name} "
                                 f"(out={lin.out_features}, in={lin.in_features})")
        wrap_targets(model, targets, lambda lin: DiaBloLinear(lin, n))
        return model

    def merged_model(self, model):
        return fold_wrappers(model)
