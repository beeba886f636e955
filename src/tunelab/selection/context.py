"""What scorers share: the default model (the one being tuned), loaded models, device and progress bars."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.recipe import ModelConfig


@dataclass
class ScoringContext:
    model: ModelConfig = field(default_factory=ModelConfig)  # the model being tuned: LM scorers' default
    device: torch.device | None = None
    progress: bool = True
    seed: int = 0
    _models: dict[str, Any] = field(default_factory=dict, repr=False)
    _tokenizers: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def model_config(self, name_or_path: str | None) -> ModelConfig:
        """A scorer's `model: null` means the run's model; a name or path means a proxy (Superfiltering)."""
        if name_or_path is None:
            return self.model
        return ModelConfig(name_or_path=name_or_path, trust_remote_code=self.model.trust_remote_code)

    def tokenizer(self, name_or_path: str | None = None):
        from tunelab.model import load_tokenizer

        cfg = self.model_config(name_or_path)
        if cfg.name_or_path not in self._tokenizers:
            self._tokenizers[cfg.name_or_path] = load_tokenizer(cfg)
        return self._tokenizers[cfg.name_or_path]

    def lm(self, name_or_path: str | None = None):
        """The causal LM in eval mode on the device; loaded once per context and shared by scorers."""
        from tunelab.model import load_model

        cfg = self.model_config(name_or_path)
        if cfg.name_or_path not in self._models:
            model = load_model(cfg).to(self.device)
            model.eval()
            self._models[cfg.name_or_path] = model
        return self._models[cfg.name_or_path]

    def model_identity(self, name_or_path: str | None = None) -> dict[str, Any]:
        """The model's name plus a fingerprint of its files (config and weight sizes), for cache keys."""
        from tunelab.model import resolve_model_path

        cfg = self.model_config(name_or_path)
        return {"name_or_path": cfg.name_or_path, "fingerprint": directory_fingerprint(resolve_model_path(cfg)[0])}


def directory_fingerprint(path: str | Path) -> str:
    """sha256 over config.json's text and the names and sizes of weight files (a hub id: the id itself)."""
    p = Path(path)
    if not p.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".gguf", ".json") and f.is_file():
            h.update(json.dumps([f.name, f.stat().st_size, int(f.stat().st_mtime)]).encode())
    return h.hexdigest()[:16]
