"""Lazy, tensor-by-tensor I/O of model weights (layer 3: merging, diagnostics and exports read through it).

* :class:`CheckpointReader` reads a Hugging Face safetensors checkpoint (single file or sharded
  ``model.safetensors.index.json``) one tensor at a time through ``safetensors.safe_open``
  (memory-mapped, so only the tensor asked for is materialised).
* :class:`AdapterReader` reads a PEFT LoRA adapter directory and materialises, per module, the
  delta it adds to the base weight: ``(B @ A) * scaling`` with ``scaling = lora_alpha / r``
  (``lora_alpha / sqrt(r)`` with ``use_rslora``), keyed by the base tensor name
  (``base_model.model.<path>.lora_A.weight`` -> ``<path>.weight``).
* :class:`CheckpointWriter` writes an HF checkpoint directory atomically: shards go to a
  temporary sibling directory that is renamed onto the output only when everything succeeded,
  together with ``config.json`` and the tokenizer files copied from the base.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tunelab.core.io import atomic_dir

Tensor = torch.Tensor

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files copied from the base checkpoint next to the merged weights.
COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def resolve_model_path(ref: str | os.PathLike[str]) -> Path:
    """A local directory for ``ref``: the path itself, or a snapshot already in the HF cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), local_files_only=True)).resolve()
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available locally"
        raise ValueError(f"model {str(ref)!r} is neither a local directory nor in the local HF cache") from exc


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class CheckpointReader:
    """Lazy reader of an HF safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = resolve_model_path(path)
        cfg = self.path / "config.json"
        self.config: dict[str, Any] = read_json(cfg) if cfg.is_file() else {}
        if (self.path / SAFE_INDEX).is_file():
            weight_map = read_json(self.path / SAFE_INDEX)["weight_map"]
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
        elif (self.path / SAFE_SINGLE).is_file():
            with safe_open(self.path / SAFE_SINGLE, framework="pt") as fh:
                self._file_of = {name: self.path / SAFE_SINGLE for name in fh.keys()}
        else:
            raise ValueError(
                f"{self.path}: no {SAFE_SINGLE} or {SAFE_INDEX} found (only safetensors checkpoints are supported)"
            )
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str):
        try:
            file = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}") from None
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def get(self, name: str) -> Tensor:
        return self._handle(name).get_tensor(name)

    def load_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Whole checkpoint in memory (``dtype`` applied to floating tensors only)."""
        out = {}
        for n in self.names():
            t = self.get(n)
            out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of a PEFT adapter file."""

    module: str  # module path relative to the model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    embedding: bool
    scaling: float
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA
    (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):  # same rule as peft.utils.other.get_pattern_key
            return value
    return default


_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


class AdapterReader:
    """Lazy reader of a PEFT LoRA adapter directory, exposing per-module deltas."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = resolve_model_path(path)
        if not is_adapter_dir(self.path):
            raise ValueError(f"{self.path}: no {ADAPTER_CONFIG}, not a PEFT adapter directory")
        self.config = read_json(self.path / ADAPTER_CONFIG)
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise ValueError(f"{self.path}: only LoRA adapters are supported, got peft_type={ptype}")
        if self.config.get("use_dora"):
            raise ValueError(f"{self.path}: DoRA adapters are not supported (magnitude vectors)")
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"{self.path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
        self._fh = safe_open(weights, framework="pt")
        self.base_model_name_or_path: str | None = self.config.get("base_model_name_or_path")
        self.modules: dict[str, LoraModule] = {}
        self.full_keys: dict[str, str] = {}  # modules_to_save: target name -> key of the full tensor
        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, bool] = {}
        save = self.config.get("modules_to_save") or []
        for key in self._fh.keys():
            for suffix, (which, emb) in _LORA_SUFFIXES.items():
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    parts.setdefault(module, {})[which] = key
                    kinds[module] = emb
                    break
            else:  # modules_to_save are stored whole, as "base_model.model.<path>.weight"
                target = self._strip(key.replace(".modules_to_save", "", 1))
                module = target.rsplit(".", 1)[0]
                if not any(re.match(rf"(.*\.)?{re.escape(m)}$", module) for m in save):
                    raise ValueError(f"{self.path}: unsupported adapter tensor {key!r}")
                self.full_keys[target] = key
        alpha = float(self.config.get("lora_alpha", 8))
        rslora = bool(self.config.get("use_rslora", False))
        fifo = bool(self.config.get("fan_in_fan_out", False))
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{self.path}: module {module!r} lacks lora_A or lora_B")
            rel = self._strip(module)
            a_shape = self._fh.get_slice(ab["A"]).get_shape()
            r = a_shape[0]
            mod_alpha = float(_pattern_value(self.config.get("alpha_pattern"), rel, alpha))
            self.modules[f"{rel}.weight"] = LoraModule(
                rel, ab["A"], ab["B"], kinds[module], lora_scaling(mod_alpha, r, rslora), fifo and not kinds[module]
            )

    @staticmethod
    def _strip(key: str) -> str:
        return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key

    def names(self) -> list[str]:
        """Base tensor names this adapter changes."""
        return list(self.modules) + list(self.full_keys)

    def raw(self, key: str) -> Tensor:
        return self._fh.get_tensor(key)

    def delta_shape(self, name: str) -> tuple[int, ...]:
        if name in self.full_keys:
            return tuple(self._fh.get_slice(self.full_keys[name]).get_shape())
        m = self.modules[name]
        b = self._fh.get_slice(m.b_key).get_shape()
        a = self._fh.get_slice(m.a_key).get_shape()
        out, inp = b[0], a[1]
        return (inp, out) if (m.embedding or m.fan_in_fan_out) else (out, inp)

    def delta(self, name: str, base: Tensor | None = None) -> Tensor:
        """float32 delta for base tensor ``name``; ``base`` is needed for modules_to_save tensors."""
        if name in self.full_keys:
            if base is None:
                raise ValueError(f"tensor {name!r}: a modules_to_save delta needs the base tensor")
            return self.raw(self.full_keys[name]).float() - base.float()
        m = self.modules[name]
        d = (self.raw(m.b_key).float() @ self.raw(m.a_key).float()) * m.scaling
        return d.T if (m.embedding or m.fan_in_fan_out) else d

    def close(self) -> None:
        self._fh = None

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_model_files(src: Path, dst: Path, patterns: Iterable[str] = COPY_PATTERNS) -> list[str]:
    """Copy config and tokenizer files (not weights) from ``src`` to ``dst``; returns the names."""
    copied = []
    for pattern in patterns:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class CheckpointWriter:
    """Streaming, atomic writer of an HF safetensors checkpoint directory.

    Use as a context manager; :meth:`add` tensors one by one. At most ``max_shard_bytes`` of
    output are buffered before a shard is flushed. On a clean exit the shards are named
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, config/tokenizer
    files are copied from ``copy_from`` (``config.json``'s dtype set to ``dtype`` if given),
    ``extra_files`` (name -> text or bytes) are written, and the directory is renamed into place.
    On an exception nothing is written.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        copy_from: str | os.PathLike[str] | None = None,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
        dtype: torch.dtype | None = None,
        extra_files: dict[str, str | bytes] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.dtype = dtype
        self.extra_files = extra_files or {}
        self._ctx = None
        self._tmp: Path | None = None
        self._shard: dict[str, Tensor] = {}
        self._shard_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self._ctx = atomic_dir(self.output_dir, exists="replace" if self.overwrite else "error")
        self._tmp = self._ctx.__enter__()
        return self

    def add(self, name: str, tensor: Tensor) -> None:
        if self._tmp is None:
            raise RuntimeError("CheckpointWriter.add outside its context")
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.detach().contiguous()
        self._shard_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._shard, str(self._tmp / f"shard-{idx:05d}.part"), metadata={"format": "pt"})
        self._shards.append(list(self._shard))
        self._shard, self._shard_bytes = {}, 0

    def _finalize(self) -> None:
        if self._shard or not self._shards:
            self._flush()
        tmp, n = self._tmp, len(self._shards)
        if n == 1:
            os.rename(tmp / "shard-00000.part", tmp / SAFE_SINGLE)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / f"shard-{i:05d}.part", tmp / fname)
                weight_map.update({k: fname for k in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        if self.copy_from is not None:
            copy_model_files(self.copy_from, tmp)
        cfg = tmp / "config.json"
        if cfg.is_file() and self.dtype in _DTYPE_NAMES:
            data = read_json(cfg)
            keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
            for k in keys:
                data[k] = _DTYPE_NAMES[self.dtype]
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for fname, content in self.extra_files.items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                (tmp / fname).write_text(content, encoding="utf-8")

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._ctx is not None
        if exc_type is not None:  # discard the temporary directory, let the exception propagate
            return bool(self._ctx.__exit__(exc_type, exc, tb))
        try:
            self._finalize()
        except BaseException as err:  # finalisation failed: discard the temporary directory too
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)
        return False


def write_checkpoint(
    output_dir: str | os.PathLike[str],
    tensors: Iterable[tuple[str, Tensor]],
    copy_from: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Write ``(name, tensor)`` pairs as an HF checkpoint dir atomically (see :class:`CheckpointWriter`)."""
    with CheckpointWriter(output_dir, copy_from=copy_from, **kwargs) as writer:
        for name, t in tensors:
            writer.add(name, t)
    return Path(output_dir)
