"""The model side of generation: eval mode and weights in the compute dtype for the call, and the two
forward passes (prefill of the prompts, one-token decoding steps) as transformers' `generate` makes them; a
batch's decoding steps go through generate/llama.py's lean step where the model is one it reproduces.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.utils import parametrize

from tunelab.core.unwrap import unwrap_model, unwrap_peft
from tunelab.generate.llama import LlamaDecoder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def grad_off(model: torch.nn.Module):
    """The no-autograd context of a generation call: `inference_mode`, except for a model sharded by FSDP2, whose
    all-gathers write into the same unsharded parameter buffers in generation and in the training steps after it
    (RL rollouts): buffers first allocated as inference tensors cannot be written outside inference mode, so a
    sharded model generates under `no_grad`."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return torch.no_grad()
    return torch.inference_mode()



def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under process (DDP) and PEFT wrappers: its config and forward signature."""
    return unwrap_peft(unwrap_model(model))


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """PEFT prompt tuning / prefix tuning / P-tuning: virtual tokens that only PEFT's own generate inserts."""
    cfg = getattr(unwrap_model(model), "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module, dtype: torch.dtype):
    """Eval mode, compiled regions eager, and every floating parameter in `dtype`, for the duration; all
    restored on exit.

    Weights already in `dtype` are untouched (no copy): with `train.frozen_cast: all` that is all the frozen
    base, so only the trainable ones (an adapter's, or all of them in full fine-tuning) are copied. The
    originals are put back as they were (the same tensors: bit for bit, optimizer state unaffected).
    Parameters that are tensor subclasses (quantised NF4, sharded DTensors) cannot be cast: yields True when
    such a parameter has another dtype, and the caller runs under autocast for them.
    """
    modes = [(m, m.training) for m in model.modules()]
    # train.compile's regions (nn.Module.compile) run eagerly: every new cache length would recompile them
    compiled = {m: impl for m in model.modules() if (impl := getattr(m, "_compiled_call_impl", None)) is not None}
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    saved_buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    # parameters under a parametrization (LoReFT's orthogonal rotation: its `original` goes through
    # torch.linalg.solve, which has no bf16 kernel on CPU) keep their dtype; the caller's autocast covers them
    parametrized = {id(p) for m in model.modules() if parametrize.is_parametrized(m) for p in m.parameters()}
    mixed = False
    try:
        for m in compiled:
            m._compiled_call_impl = None
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_floating_point() or p.dtype == dtype:
                    continue
                if type(p.data) is torch.Tensor and id(p) not in parametrized:
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
                else:
                    mixed = True
            # PEFT adapters that keep weights as buffers (VeRA's shared random projections) go with the parameters
            # they multiply; the base model's buffers (rotary inverse frequencies) stay as transformers keeps them
            for m in model.modules():
                if not type(m).__module__.startswith("peft."):
                    continue
                for name, b in m.named_buffers(recurse=False):
                    if b.is_floating_point() and b.dtype != dtype:
                        saved_buffers.append((m, name, b))
                        m._buffers[name] = b.to(dtype)
        yield mixed
    finally:
        for p, original in saved:
            p.data = original
        for m, name, original_buffer in saved_buffers:
            m._buffers[name] = original_buffer
        for m, training in modes:
            m.training = training
        for m, impl in compiled.items():
            m._compiled_call_impl = impl


class ModelStep:
    """Calls the model's forward exactly as transformers' generate does (same inputs, same shapes), so the
    numerics are the same, with two differences that do not change them:

    * the prefill's logits come from the last position only, selected with an index tensor: a contiguous
      [B, 1, d] copy. `logits_to_keep=1` slices a strided view, which `aten::matmul` does not fold into a
      matrix when the weight is frozen: it runs a batched matmul against the weight expanded to
      [B, d, vocab], which the CPU's bf16 kernel materialises (1.8 GB for SmolLM2 at batch 32: the "known
      generation-memory issue", docs/engine.md);
    * the KV cache is the caller's (tunelab.generate.cache).
    """

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None):
        self.module = unwrap_model(model)  # a PEFT wrapper stays: its forward applies the adapters
        params = inspect.signature(hf_model(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.config = hf_model(model).config
        self.device = next(model.parameters()).device
        self.autocast = autocast_dtype

    def _call(self, **kwargs) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.module(use_cache=True, return_dict=True, **kwargs)
        # HF: next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, V] fp32 of the last prompt position; fills `cache` with the prompts' keys and values."""
        kwargs = {}
        if self.keep_kw is not None:
            kwargs[self.keep_kw] = torch.tensor([ids.shape[1] - 1], device=self.device)
        return self._call(input_ids=ids.to(self.device), attention_mask=_to(mask, self.device),
                          position_ids=positions.to(self.device), **{self.cache_kw: cache}, **kwargs)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, V] fp32 after one new token per row (tokens [B, 1], positions [B, 1])."""
        return self._call(input_ids=tokens.to(self.device), attention_mask=_to(mask, self.device),
                          position_ids=positions.to(self.device), **{self.cache_kw: cache})

    def decoder(self, cache, mask: torch.Tensor | None, capacity: int):
        """The decoding steps of one batch after its prefill: the lean Llama-family step (generate/llama.py)
        where the model allows it, else the model's forward. `mask` [B, capacity] (1 = real token, padding 0,
        positions not generated yet 1), None when no row is padded."""
        lean = None if self.autocast is not None else LlamaDecoder.build(self.module, cache, mask, capacity,
                                                                         next(self.module.parameters()).dtype)
        return lean if lean is not None else _ForwardDecoder(self, cache, mask)


class _ForwardDecoder:
    """Decoding steps through the model's forward (`ModelStep.decode`), the mask cut to the cache's length."""

    def __init__(self, step: ModelStep, cache, mask: torch.Tensor | None):
        self.model_step, self.cache, self.mask = step, cache, mask

    def select_rows(self, keep: torch.Tensor) -> None:
        if self.mask is not None:
            self.mask = self.mask[keep.to(self.mask.device)]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        length = self.cache.get_seq_length() + 1
        mask = None if self.mask is None else self.mask[:, :length]
        return self.model_step.decode(tokens, mask, positions, self.cache)


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
