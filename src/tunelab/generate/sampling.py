"""Choosing the next token from the last position's logits: greedy, or temperature + top-k + top-p sampling.

The sampled distribution is transformers' (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
in that order; tests/generate/test_sampling.py compares the two):

    p = softmax(z / T)                                        temperature T
    top-k (Fan et al. 2018): keep the k largest p, renormalise
    top-p (Holtzman et al. 2020, "nucleus"): sort p descending, keep token i while the mass of the tokens
          ranked before it is < top_p (so the token that crosses top_p is kept, and always the first one)

Fused: one `topk` gives the candidates in descending order, and top-p is decided on them; only when the
candidates' mass is below top_p (a flat distribution whose nucleus is wider than the candidates) is that row
sorted over the whole vocabulary. The draw is an inverse-CDF lookup with ONE uniform number per sequence and
step: u ~ U[0, 1), token = first candidate whose cumulative probability exceeds u * total. Those uniforms come
from a generator per sequence seeded by (seed, sequence index), so a completion does not depend on which other
sequences shared its batch, nor on finished rows being dropped from it.
"""

from __future__ import annotations

import torch

from tunelab.generate.config import GenerateConfig

TOP_P_CANDIDATES = 256  # candidates tried before a row's full sort (top-p without top-k)


def mix_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit generator seed for sequence `index` of a call seeded `seed` (an LCG step)."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1013904223) % (2**63)


def sequence_uniforms(seed: int, indices: list[int], steps: int) -> torch.Tensor:
    """[len(indices), steps] float32 uniforms in [0, 1): row r is sequence indices[r]'s stream, one per step."""
    out = torch.empty(len(indices), steps, dtype=torch.float32)
    for r, i in enumerate(indices):
        out[r] = torch.rand(steps, generator=torch.Generator().manual_seed(mix_seed(seed, i)))
    return out


def _scaled(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    return logits / cfg.temperature if cfg.temperature != 1.0 else logits


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the candidates (columns, descending probability) whose preceding mass is already >= top_p."""
    if top_p >= 1.0:
        return probs
    before = torch.cumsum(probs, dim=-1) - probs
    return probs.masked_fill(before >= top_p, 0.0)


def candidates(z: torch.Tensor, cfg: GenerateConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sampling distribution of scaled logits z [B, V] as (probs [B, K], token ids [B, K], short).

    Candidates are in descending probability (vocabulary order when neither top-k nor top-p is set, K = V);
    tokens cut by top-k / top-p have probability 0 and probs are not renormalised (the draw scales by the
    row's total). `short` [B] (top-p without top-k only) marks rows whose nucleus may extend past the
    TOP_P_CANDIDATES candidates: `full_nucleus` must decide those; None when no row needs it.
    """
    vocab = z.shape[-1]
    if cfg.top_k == 0 and cfg.top_p >= 1.0:
        return torch.softmax(z, dim=-1), torch.arange(vocab, device=z.device).expand_as(z), None
    if cfg.top_k > 0:
        vals, ids = z.topk(min(cfg.top_k, vocab), dim=-1)  # sorted descending
        return _nucleus(torch.softmax(vals, dim=-1), cfg.top_p), ids, None  # renormalised over the top k (HF)
    vals, ids = z.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
    probs = torch.exp(vals - torch.logsumexp(z, dim=-1, keepdim=True))  # full-vocabulary probabilities
    short = probs.sum(-1) < cfg.top_p
    return _nucleus(probs, cfg.top_p), ids, (short if bool(short.any()) else None)


def full_nucleus(z: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over the whole vocabulary (one full sort per row): (probs [B, V], ids [B, V])."""
    vals, ids = z.sort(dim=-1, descending=True)
    return _nucleus(torch.softmax(vals, dim=-1), top_p), ids


def _draw(probs: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first candidate whose cumulative probability exceeds u * total (never a zeroed one)."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    return ids.gather(1, pos).squeeze(1)


def next_tokens(logits: torch.Tensor, cfg: GenerateConfig, uniforms: torch.Tensor | None) -> torch.Tensor:
    """[B] next token ids from logits [B, V] fp32: arg-max when greedy (ties: the lowest id, as torch.argmax
    and transformers), else one draw per row from `uniforms` [B] in the temperature/top-k/top-p distribution."""
    if not cfg.do_sample:  # max's indices: the same ids (first maximum, documented), ~2x faster than argmax on CPU
        return logits.max(dim=-1).indices
    if uniforms is None:
        raise ValueError("sampling needs one uniform number per row")
    z = _scaled(logits, cfg)
    probs, ids, short = candidates(z, cfg)
    tokens = _draw(probs, ids, uniforms)
    if short is not None:
        rows = short.nonzero().squeeze(1)
        tokens[rows] = _draw(*full_nucleus(z[rows], cfg.top_p), uniforms[rows])
    return tokens


def distribution(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """The normalised sampling distribution [B, V] (dense; for tests and analysis, not used when decoding)."""
    z = _scaled(logits, cfg)
    probs, ids, short = candidates(z, cfg)
    dense = torch.zeros_like(z).scatter_(1, ids, probs)
    if short is not None:
        rows = short.nonzero().squeeze(1)
        p, i = full_nucleus(z[rows], cfg.top_p)
        dense[rows] = torch.zeros_like(p).scatter_(1, i, p)
    return dense / dense.sum(-1, keepdim=True)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] per row, [B] fp32: the policy's log-probability of the sampled token over
    the whole vocabulary (TRL's convention for the old log-probs: temperature applied, top-k/top-p not)."""
    z = logits / temperature if temperature != 1.0 else logits
    return z.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)
