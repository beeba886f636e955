"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template and a tiny random Llama.

Both are built offline in a second or two, saved as an ordinary HF model directory, and loaded by
path through the same code users run (`tunelab.model.load_model` / `load_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import build_tiny_model, build_tiny_tokenizer, tiny_recipe_dict  # noqa: F401


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread for every test: the models and matrices are tiny, and on a shared 2-core machine
    OpenMP barrier waits with 2 threads made them ~10-50x slower (measured: 59 s -> 6 s for an end-to-end test).
    Subprocesses (torchrun, benchmarks) choose their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An HF model directory (config, safetensors weights, tokenizer with chat template)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from tunelab.model import load_tokenizer
    from tunelab.recipe import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from tunelab.model import load_model
    from tunelab.recipe import ModelConfig

    return load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
