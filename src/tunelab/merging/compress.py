"""Delta compression: BitDelta (1 bit per weight + one scale) and truncated-SVD low rank.

Both compressors return a :class:`Compressed` triple ``(data, decompress, ratio)``:
``data`` is the compressed form, ``decompress()`` rebuilds a dense tensor (dtype of the input
delta) and ``ratio = compressed bytes / dense bytes``. The dense size is counted in
``reference_dtype`` (default: the delta's own dtype), so ``ratio`` for BitDelta on a bf16
delta is ``(ceil(n / 8) + 4) / (2 n)``, i.e. ~1/16 (1 bit against 16 bits, plus one float32 scale).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch

Tensor = torch.Tensor

__all__ = [
    "Compressed",
    "BitDeltaPacked",
    "LowRankDelta",
    "pack_signs",
    "unpack_signs",
    "bitdelta_compress",
    "bitdelta_decompress",
    "svd_compress",
    "svd_decompress",
    "compress_deltas",
    "DeltaCompressor",
    "bitdelta_compressible",
    "distill_bitdelta_scales",
]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class Compressed(NamedTuple):
    data: object
    decompress: Callable[[], Tensor]
    ratio: float


@dataclass(frozen=True)
class BitDeltaPacked:
    """``bits``: uint8, 8 signs per byte, MSB first, 1 = non-negative; ``scale``: float32 scalar."""

    bits: Tensor
    scale: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size() + self.scale.numel() * self.scale.element_size()


@dataclass(frozen=True)
class LowRankDelta:
    """``delta ~ up @ down`` with ``up = U_r diag(S_r)`` (m x r) and ``down = Vh_r`` (r x n)."""

    up: Tensor
    down: Tensor
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down))


def _dense_bytes(t: Tensor, reference_dtype: torch.dtype | None) -> int:
    dtype = reference_dtype or t.dtype
    return t.numel() * torch.empty((), dtype=dtype).element_size()


def pack_signs(t: Tensor) -> Tensor:
    """Pack ``t >= 0`` into uint8, 8 entries per byte (most significant bit first, zero padded)."""
    bits = (t.reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_signs`: a float32 vector of ``+1`` / ``-1`` of length ``numel``."""
    bits = (packed.view(-1, 1) & _BIT_WEIGHTS) != 0
    bits = bits.reshape(-1)[:numel]
    return bits.to(torch.float32) * 2 - 1


def bitdelta_decompress(packed: BitDeltaPacked) -> Tensor:
    """``scale * sign`` as a dense tensor of the original shape and dtype."""
    numel = 1
    for s in packed.shape:
        numel *= s
    signs = unpack_signs(packed.bits, numel).reshape(packed.shape)
    return (packed.scale * signs).to(packed.dtype)


def bitdelta_compress(delta: Tensor, reference_dtype: torch.dtype | None = None) -> Compressed:
    """BitDelta 1-bit delta quantisation (Liu et al. 2024, https://arxiv.org/abs/2402.10193).

    ``delta ~ alpha * sign(delta)`` with ``alpha = mean |delta|`` (one scale per matrix; the L2
    optimal scale for a sign code). ``sign(0)`` is taken as ``+1`` because a bit has two states.
    Storage is the packed bits plus the scale as float32. This is the paper's first stage; the second
    (the scales distilled against the fine-tuned model on calibration text) is
    :func:`distill_bitdelta_scales` (``tunelab merge --calibration``).
    """
    if delta.numel() == 0:
        raise ValueError("bitdelta_compress: empty tensor")
    scale = delta.detach().float().abs().mean().reshape(())
    packed = BitDeltaPacked(pack_signs(delta.detach()), scale, tuple(delta.shape), delta.dtype)
    ratio = packed.nbytes / _dense_bytes(delta, reference_dtype)
    return Compressed(packed, functools.partial(bitdelta_decompress, packed), ratio)


def svd_decompress(low_rank: LowRankDelta) -> Tensor:
    """``up @ down`` in the original dtype."""
    return (low_rank.up.float() @ low_rank.down.float()).to(low_rank.dtype)


def svd_compress(
    delta: Tensor, rank: int, reference_dtype: torch.dtype | None = None, store_dtype: torch.dtype | None = None
) -> Compressed:
    """Low-rank delta by truncated SVD (Eckart-Young; delta-compression use as in Ryu et al. 2023,
    https://arxiv.org/abs/2305.18425): ``delta ~ U_r diag(S_r) Vh_r``.

    ``delta`` must be 2-D; ``rank`` is capped at ``min(m, n)``. Factors are stored in
    ``store_dtype`` (default the delta's dtype), so ``ratio = r (m + n) / (m n)`` when both dtypes
    agree.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd_compress needs a 2-D delta, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rank = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    store = store_dtype or delta.dtype
    low_rank = LowRankDelta((u[:, :rank] * s[:rank]).to(store), vh[:rank].to(store), delta.dtype)
    ratio = low_rank.nbytes / _dense_bytes(delta, reference_dtype)
    return Compressed(low_rank, functools.partial(svd_decompress, low_rank), ratio)


def compress_deltas(
    deltas: Mapping[str, Tensor],
    compressor: Callable[[Tensor], Compressed],
    only_2d: bool = True,
    reference_dtype: torch.dtype | None = None,
) -> Compressed:
    """Compress every tensor of a delta state dict with ``compressor`` (e.g. ``bitdelta_compress`` or
    ``functools.partial(svd_compress, rank=8)``).

    With ``only_2d`` (the BitDelta paper compresses the linear layers only) other tensors are kept
    dense. Returns ``Compressed(dict name -> Compressed | Tensor, decompress -> state dict, ratio)``
    with the ratio over the whole dict.
    """
    out: dict[str, Compressed | Tensor] = {}
    compressed_bytes = dense_bytes = 0
    for name, delta in deltas.items():
        dense_bytes += _dense_bytes(delta, reference_dtype)
        if only_2d and delta.dim() != 2:
            out[name] = delta
            compressed_bytes += _dense_bytes(delta, reference_dtype)
            continue
        c = compressor(delta)
        out[name] = c
        compressed_bytes += c.data.nbytes  # type: ignore[attr-defined]

    def decompress() -> dict[str, Tensor]:
        return {k: v.decompress() if isinstance(v, Compressed) else v for k, v in out.items()}

    return Compressed(out, decompress, compressed_bytes / max(dense_bytes, 1))


def _is_embedding(name: str) -> bool:
    return "embed" in name or "lm_head" in name


def bitdelta_compressible(name: str, delta: Tensor) -> bool:
    """The tensors ``merge_method: bitdelta`` compresses: non-zero 2-D deltas outside the embeddings / LM head
    (the paper's linear layers of the blocks). The rest is kept exactly."""
    return delta.dim() == 2 and not _is_embedding(name) and bool(delta.any())


def distill_bitdelta_scales(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    signs: Mapping[str, Tensor],
    scales: Mapping[str, float],
    batches: list[dict[str, Tensor]],
    *,
    steps: int = 100,
    lr: float = 1e-4,
    relative_lr: float | None = None,
) -> tuple[dict[str, float], list[float]]:
    """BitDelta's second stage (Liu et al. 2024, https://arxiv.org/abs/2402.10193, section 3.2; reference code
    github.com/FasterDecoding/BitDelta `train.py`): the per-matrix scales alpha_i are trained so that the
    compressed model's logits match the fine-tuned model's, the signs frozen:

        W_i = W_base,i + alpha_i * sign(Delta_i),   min_alpha  mean_(tokens, vocab) (z_student - z_teacher)^2,

    with AdamW(lr) and cosine annealing over ``steps`` steps, as the reference (lr 1e-4, 100 steps of 4 x 128
    tokens by default). ``student`` holds the BASE values of the compressed tensors (and the fine-tuned values of
    every other one); ``signs`` [same shapes] are +-1; ``batches`` cycle (input_ids, attention_mask); the mean is
    over real tokens (the reference pads to 128 and averages over pads too). The student's weights are left at
    the distilled ``W_i``. Returns (scales, per-step losses).

    Adam moves each scale by about ``lr`` per step whatever its size, so the reference's 1e-4 suits its deltas
    (7B chat fine-tunes) but overshoots the scales of a short fine-tune (mean |delta| ~ 1e-5..1e-4: measured,
    a 10-step distillation at 1e-4 raised the logits MSE 2.5x). ``relative_lr`` instead gives matrix i the
    rate ``relative_lr * alpha_i`` (Adam on alpha_i / alpha_i(0) at rate ``relative_lr``).
    """
    from torch.func import functional_call

    params = dict(student.named_parameters())
    missing = [n for n in signs if n not in params]
    if missing:
        raise KeyError(f"distill_bitdelta_scales: the student has no tensor {missing[0]!r}")
    base = {n: params[n].detach().float().clone() for n in signs}
    alpha = {n: torch.nn.Parameter(torch.tensor(float(scales[n]))) for n in signs}  # one scalar per matrix
    student.requires_grad_(False)
    teacher.requires_grad_(False)
    student.eval()
    teacher.eval()
    if relative_lr is None:
        opt = torch.optim.AdamW(list(alpha.values()), lr=lr)  # torch's defaults, as the reference's
    else:
        opt = torch.optim.AdamW([{"params": [a], "lr": relative_lr * max(abs(a.item()), 1e-12)}
                                 for a in alpha.values()], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        mask = batch["attention_mask"].bool()  # [B, T]
        with torch.no_grad():
            target = teacher(**batch).logits.float()  # [B, T, V]
        weights = {n: (base[n] + alpha[n] * signs[n]).to(params[n].dtype) for n in signs}
        logits = functional_call(student, weights, args=(), kwargs=batch).logits.float()
        loss = (logits - target).pow(2)[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        for n in signs:
            params[n].copy_((base[n] + alpha[n].detach() * signs[n]).to(params[n].dtype))
    return {n: float(a.detach()) for n, a in alpha.items()}, losses


@dataclass
class DeltaCompressor:
    """Per-tensor delta compression with byte accounting, for ``merge_method: bitdelta | svd_delta``.

    ``__call__(name, delta, dtype)`` returns the reconstructed delta (float32) that replaces ``delta``:
    the 2-D matrices of the transformer blocks are compressed (BitDelta, or rank-``rank`` SVD when
    that is smaller than the dense matrix); embeddings / LM head and 1-D tensors (norms, biases) are
    kept exactly, as in the BitDelta paper which compresses the linear layers of the blocks; an
    all-zero delta (a module a LoRA fine-tune did not touch) costs nothing. Sizes are counted against
    storing the delta densely in ``dtype`` (the output's dtype); ``ratio = stored / dense`` over every
    floating tensor, ``compressed_ratio`` over the compressed matrices alone (~1/32 for BitDelta in fp32).
    """

    method: Literal["bitdelta", "svd_delta"]
    rank: int = 16
    dense_bytes: int = 0
    stored_bytes: int = 0
    compressed_dense_bytes: int = 0
    compressed_stored_bytes: int = 0
    compressed: int = 0
    kept_dense: int = 0
    unchanged: int = 0

    def __call__(self, name: str, delta: Tensor, dtype: torch.dtype) -> Tensor:
        dense = _dense_bytes(delta, dtype)
        self.dense_bytes += dense
        delta = delta.float()
        if not bool(delta.any()):
            self.unchanged += 1
            return delta
        small = self.method == "svd_delta" and self.rank * sum(delta.shape) >= delta.numel()
        if not bitdelta_compressible(name, delta) or small:
            self.kept_dense += 1
            self.stored_bytes += dense
            return delta
        if self.method == "bitdelta":
            c = bitdelta_compress(delta, reference_dtype=dtype)
        else:
            c = svd_compress(delta, self.rank, reference_dtype=dtype, store_dtype=dtype)
        nbytes = c.data.nbytes  # type: ignore[attr-defined]
        self.compressed += 1
        self.stored_bytes += nbytes
        self.compressed_dense_bytes += dense
        self.compressed_stored_bytes += nbytes
        return c.decompress().float()

    @property
    def ratio(self) -> float:
        return self.stored_bytes / max(self.dense_bytes, 1)

    @property
    def compressed_ratio(self) -> float:
        return self.compressed_stored_bytes / max(self.compressed_dense_bytes, 1)

    def report(self) -> dict[str, object]:
        out = asdict(self)
        if self.method == "bitdelta":
            del out["rank"]
        return {**out, "ratio": self.ratio, "compressed_ratio": self.compressed_ratio}
