"""Per-token building blocks for SFT variants; the SFT objective (`tunelab.objectives.sft`) calls them.

* `dft_token_weights`: Dynamic Fine-Tuning's stop-gradient probability weights.
* `neftune_noise`: NEFTune's uniform noise on the input embeddings (training only).
* `masked_thought`: Masked Thought's random replacement of response tokens in the input.

All are pure tensor functions. Shapes follow `tunelab.objectives.sft.shifted_token_losses`:
logits [B, T, V] and labels [B, T] (-100 = no target), and per-token outputs are [B, T-1],
aligned with labels[:, 1:].
"""

from __future__ import annotations

import torch

from tunelab.core.constants import IGNORE_INDEX


def dft_token_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DFT weights (Wu et al. 2025, "On the Generalization of SFT...", https://arxiv.org/abs/2508.05629).

    L_DFT = -sum_t sg(p(y_t | y_<t, x)) * log p(y_t | y_<t, x): each target token's cross-entropy is
    scaled by its own probability, with the gradient stopped through the weight.

    Returns w [B, T-1] = p(labels[:, 1:] | logits[:, :-1]), detached, >= fp32, 0 where there is no
    target; DFT's per-token loss is `w * ce` with `ce` from `shifted_token_losses`.
    """
    with torch.no_grad():
        lg = logits[:, :-1]
        lg = lg.to(torch.promote_types(lg.dtype, torch.float32))
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        safe = targets.masked_fill(~mask, 0)
        logp = lg.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)
        return logp.exp().masked_fill(~mask, 0.0)


def neftune_noise(
    embeds: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None = None,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NEFTune (Jain et al. 2023, https://arxiv.org/abs/2310.05914, Alg. 1): noisy input embeddings.

    X_emb + (alpha / sqrt(L d)) * eps,  eps ~ Uniform(-1, 1)^{L x d}, L = sequence length, d = width.

    embeds [B, T, d]; mask [B, T] (1 = real token) or None (all real). L is the number of real
    tokens of EACH sequence, and padding gets no noise (the padding-aware form of the authors'
    code). Returns `embeds` itself (no noise, no copy) when `training` is False or alpha == 0;
    otherwise a new tensor, so call it from a forward hook of the embedding layer with
    `training=module.training`. A `generator` must live on `embeds.device`.
    """
    if not training or alpha == 0:
        return embeds
    b, t, d = embeds.shape
    if mask is None:
        mask = torch.ones(b, t, device=embeds.device, dtype=embeds.dtype)
    m = mask.to(embeds.dtype)
    lengths = m.sum(dim=1).clamp(min=1)  # [B]
    scale = alpha / torch.sqrt(lengths * d)  # [B]
    u = torch.rand(embeds.shape, generator=generator, device=embeds.device, dtype=torch.float32)
    noise = (2.0 * u - 1.0).to(embeds.dtype) * m.unsqueeze(-1) * scale.view(b, 1, 1)
    return embeds + noise


def masked_thought(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    p: float,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked Thought (Chen et al. 2024, https://arxiv.org/abs/2403.02178): corrupt the response in the input.

    x'_t = [MASK] with probability p if t is a response token (labels[t] != -100), else x_t;
    the targets stay the original tokens (labels untouched).

    Each response token is replaced independently (Bernoulli(p)), so the masked fraction is p in
    expectation. Prompt and padding tokens are never touched. Returns a new input_ids tensor;
    `labels` is not modified. Apply in training only.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ")
    response = labels != IGNORE_INDEX
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    replace = response & (u < p)
    return input_ids.masked_fill(replace, mask_token_id)


__all__ = ["dft_token_weights", "neftune_noise", "masked_thought"]
