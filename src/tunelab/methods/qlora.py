"""QLoRA: LoRA on a frozen base stored in 4-bit NormalFloat with double-quantised block constants.

Dettmers et al. 2023, https://arxiv.org/abs/2305.14314. Update rule: as LoRA, W' = deq(NF4(W0)) + (alpha/r)
B A with only A and B training; W0 is stored as 4-bit NF4 codes (two per byte) with one absmax scale per
`block_size` entries, and those scales are themselves quantised to int8 per `scaler_block_size` scales
(double quantisation). The forward pass dequantises each weight to the compute dtype on the fly.

Backend: torchao's NF4Tensor (`to_nf4`), which runs on CPU and CUDA; each quantised Linear keeps an
nn.Linear whose weight is an NF4Tensor (F.linear on it dequantises), and PEFT wraps it as usual.
Defaults: block 64 and scaler block 256 (the paper's), quantising every Linear except the LM head
(embeddings and norms stay in full precision, as in the paper), the base dequantising to bf16 (the
paper's compute dtype); LoRA options as the `lora` method. When a matrix's number of blocks is not a
multiple of 256 the scaler block shrinks to gcd(n_blocks, 256) (torchao requires it to divide).

`memory_report(model)` gives the bytes of the NF4 base (codes + int8 scales + scale factors) against
bf16 and fp32 (~0.26x bf16). The merged export dequantises the base to bf16, folds B A in and saves a
plain bf16 HF model. The NF4 round-trip error is bounded by half the largest NF4 code gap times the
block absmax, plus the int8 error of the block scale (tested).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field

from tunelab.methods.lora import LoRAOptions, PeftAdapterMethod, lora_peft_config
from tunelab.methods.registry import register

log = logging.getLogger(__name__)


def _nf4_module():
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


def quantize_nf4(w: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256):
    """NF4Tensor of w (in w's dtype). The scaler block shrinks to gcd(n_blocks, scaler_block_size)."""
    if w.numel() % block_size:
        raise ValueError(f"NF4: {w.numel()} entries are not a multiple of block_size {block_size}")
    n_blocks = w.numel() // block_size
    return _nf4_module().to_nf4(w.contiguous(), block_size, math.gcd(n_blocks, scaler_block_size))


def is_nf4(t) -> bool:
    return type(t).__name__ == "NF4Tensor"


def nf4_nbytes(t) -> int:
    """Storage of an NF4Tensor: packed codes + int8 block scales + per-scaler-block factors + mean + codebook."""
    return sum(x.numel() * x.element_size() for x in
               (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4))


def dequantize(t) -> torch.Tensor:
    return t.get_original_weight()


class QLoRAOptions(LoRAOptions):
    block_size: int = Field(64, ge=2, description="Entries per NF4 absmax block.")
    scaler_block_size: int = Field(256, ge=1, description="Block scales per int8 double-quantisation block.")
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"],
                                    description="Linear modules (name suffixes) left unquantised.")
    base_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16",
                                                                  description="dtype the NF4 base dequantises to.")


@register("qlora", paper="https://arxiv.org/abs/2305.14314")
class QLoRA(PeftAdapterMethod):
    trains = "LoRA A, B on a frozen NF4-quantised base"
    Config = QLoRAOptions

    def peft_config(self):
        opts = {k: v for k, v in self.config.model_dump().items() if k in LoRAOptions.model_fields}
        return lora_peft_config(LoRAOptions(**opts))

    @torch.no_grad()
    def quantize_base(self, model) -> int:
        """Replace the weight of every Linear (except skip_modules) by its NF4Tensor; returns how many."""
        dtype = getattr(torch, self.config.base_dtype)
        n = 0
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in self.config.skip_modules:
                if m.weight.numel() % self.config.block_size:
                    log.warning("qlora: %s (%d entries) is not a multiple of block_size; left unquantised",
                                name, m.weight.numel())
                    continue
                q = quantize_nf4(m.weight.detach().to(dtype), self.config.block_size, self.config.scaler_block_size)
                m.weight = torch.nn.Parameter(q, requires_grad=False)
                n += 1
        return n

    def prepare(self, model):
        n = self.quantize_base(model)
        if n == 0:
            raise ValueError("method qlora: no Linear module was quantised")
        report = memory_report(model)
        log.info("qlora: %d linear weights in NF4: %.1f MB (bf16 would be %.1f MB, %.2fx)", n,
                 report["nf4_bytes"] / 2**20, report["bf16_bytes"] / 2**20, report["ratio_vs_bf16"])
        return super().prepare(model)

    @torch.no_grad()
    def merged_model(self, model):
        """Dequantise the base to bf16, fold (alpha/r) B A in, return a plain bf16 transformers model."""
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and is_nf4(m.weight):
                m.weight = torch.nn.Parameter(dequantize(m.weight).to(torch.bfloat16), requires_grad=False)
        merged = model.merge_and_unload()
        return merged.to(torch.bfloat16)


def memory_report(model) -> dict[str, Any]:
    """Bytes of the NF4-quantised weights against the same weights in bf16 and fp32."""
    nf4 = numel = 0
    for m in model.modules():
        w = m.weight if isinstance(m, torch.nn.Linear) else None  # not PEFT wrappers (their .weight is the base's)
        if w is not None and is_nf4(w):
            nf4 += nf4_nbytes(w)
            numel += w.numel()
    return {"n_params": numel, "nf4_bytes": nf4, "bf16_bytes": 2 * numel, "fp32_bytes": 4 * numel,
            "ratio_vs_bf16": nf4 / max(2 * numel, 1), "bits_per_param": 8 * nf4 / max(numel, 1)}
