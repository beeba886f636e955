"""Compute precision: the precision -> autocast dtype map, `autocast_context`, and `precision: auto`.

`precision: auto` (the default of `train.precision`, evaluation, generation and the selection scorers) is
resolved once where a run starts, for the device that computes, by `resolve_precision`:

  * CUDA with native bf16 (compute capability >= 8.0: Ampere, Hopper, ...)     -> bf16
  * CUDA without bf16 (Volta, Turing, ...)                                     -> fp16 (with loss scaling:
    the runner gives accelerate `mixed_precision="fp16"`, whose GradScaler the loop's `accelerator.backward`,
    `clip_grad_norm_` and optimizer step go through)
  * CPU with native bf16 (x86 `avx512_bf16` or AMX `amx_bf16`; AArch64 `bf16`)  -> bf16
  * any other CPU (AVX2-only laptops and servers)                              -> fp32
  * other devices (mps, xpu, ...)                                              -> bf16 if native, else fp32

Why fp32 on an AVX2-only CPU: there bf16 matmuls are emulated (converted element by element), measured at
0.3 GFLOP/s against 15-20 GFLOP/s for fp32 on the same 2-core machine (issue 15), so bf16 is ~60x slower.

`resolve_precision` is a pure function of a `Capability` (what the device computes natively), so the
decision for every kind of hardware is testable without it; `detect_capability(device)` builds one from
`/proc/cpuinfo`, torch's CPU probes and CUDA's compute capability. An explicit `bf16`/`fp16`/`fp32` is
always honoured (`explain_precision` says when it is emulated and therefore slow).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# precision -> autocast dtype (None: no autocast, compute in the weights' dtype, fp32 by default)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# recipe dtype names (model.dtype, train.frozen_dtype, merge dtype) -> torch dtype
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# /proc/cpuinfo flags that mean native bf16 arithmetic (x86: AVX-512 BF16, AMX; AArch64: the BF16 extension)
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Capability:
    """What a device computes natively. `name` says what was seen (for the printed reason)."""

    device_type: str  # "cpu", "cuda", "mps", ...
    bf16: bool  # native bf16 matmuls (not emulated)
    fp16: bool = False  # native fp16 matmuls (GPUs; CPUs are treated as not, autocast fp16 on CPU is slow)
    name: str = ""  # e.g. "amx", "avx512_bf16", "avx2", "NVIDIA A100 (sm_80)"


def cpu_capability(flags: set[str] | frozenset[str] | None = None, isa: str | None = None) -> Capability:
    """A CPU's capability from its /proc/cpuinfo `flags` and torch's `get_cpu_capability()` (`isa`).

    Pure when both are given (tests feed them); read from this machine otherwise. The name is the best
    native-bf16 feature found, or torch's vector ISA in lower case ("avx2", "avx512", "default")."""
    if flags is None:
        flags = _cpuinfo_flags()
    if isa is None:
        isa = torch.backends.cpu.get_cpu_capability()
    for flag in _BF16_CPU_FLAGS:
        if flag in flags:
            return Capability("cpu", bf16=True, name="amx" if flag == "amx_bf16" else flag)
    if not flags:  # no /proc/cpuinfo (macOS, Windows): ask torch's own probe (x86 only)
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if probe is not None and probe():
            return Capability("cpu", bf16=True, name="avx512_bf16")
    return Capability("cpu", bf16=False, name=isa.lower())


def cuda_capability(major: int, minor: int, name: str = "CUDA") -> Capability:
    """A CUDA GPU's capability from its compute capability: bf16 from sm_80 (Ampere) on, fp16 from sm_53."""
    return Capability("cuda", bf16=major >= 8, fp16=(major, minor) >= (5, 3), name=f"{name} (sm_{major}{minor})")


@functools.lru_cache(maxsize=None)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / AArch64
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def _detect(device_type: str, index: int | None) -> Capability:
    if device_type == "cpu":
        return cpu_capability()
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return cuda_capability(major, minor, torch.cuda.get_device_name(index))
    return Capability(device_type, bf16=False, name=device_type)


def detect_capability(device: torch.device | str) -> Capability:
    """This machine's capability for `device` (cached: /proc/cpuinfo is read once)."""
    device = torch.device(device)
    return _detect(device.type, device.index)


def explain_precision(requested: str, device: torch.device | str,
                      capability: Capability | None = None) -> tuple[Precision, str]:
    """(the precision to compute in, why): `auto` resolved for the device, any other value kept."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    cap = capability or detect_capability(device)
    what = f"this {'CPU' if cap.device_type == 'cpu' else cap.device_type.upper()}"
    if requested != "auto":
        if requested == "bf16" and not cap.bf16:
            return "bf16", f"as asked; {what} has no native bf16 ({cap.name}): emulated, many times slower than fp32"
        return requested, "as asked"  # type: ignore[return-value]
    if cap.bf16:
        return "bf16", f"auto: {what} computes bf16 natively: {cap.name}"
    if cap.device_type == "cuda" and cap.fp16:
        return "fp16", f"auto: {what} has no bf16 ({cap.name}); fp16 with loss scaling"
    return "fp32", f"auto: {what} has no native bf16: {cap.name}"


def resolve_precision(requested: str, device: torch.device | str,
                      capability: Capability | None = None) -> Precision:
    """`auto` -> "bf16" | "fp16" | "fp32" for `device` (see the module docstring); other values unchanged."""
    return explain_precision(requested, device, capability)[0]


def autocast_context(device: torch.device, precision: str):
    """Autocast to the precision's dtype on `device` (nothing for fp32). `auto` is resolved for `device`."""
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
