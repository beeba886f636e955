"""The sampler's distribution is transformers' (temperature -> top-k -> top-p), and its draws follow it."""

from __future__ import annotations

import pytest
import torch

from tunelab.generate import GenerateConfig
from tunelab.generate.sampling import TOP_P_CANDIDATES, distribution, next_tokens, sequence_uniforms, token_logprobs


def hf_distribution(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    z = TemperatureLogitsWarper(cfg.temperature)(None, logits.clone())
    if cfg.top_k:
        z = TopKLogitsWarper(cfg.top_k)(None, z)
    if cfg.top_p < 1:
        z = TopPLogitsWarper(cfg.top_p)(None, z)
    return torch.softmax(z, dim=-1)


def logits_batch(vocab: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, vocab, generator=g) * 4  # nucleus within the first candidates
    flat = torch.randn(3, vocab, generator=g) * 0.05  # nucleus wider than TOP_P_CANDIDATES: the full-sort path
    return torch.cat([peaked, flat])


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=20), dict(top_p=0.9),
                                dict(top_p=0.95, temperature=1.3), dict(top_k=300, top_p=0.8)])
def test_distribution_equals_transformers(kw):
    cfg = GenerateConfig(do_sample=True, **kw)
    logits = logits_batch()
    ours = distribution(logits, cfg)
    ref = hf_distribution(logits, cfg)
    assert torch.equal(ours > 0, ref > 0)  # the same candidates survive
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)
    if "top_p" in kw and "top_k" not in kw:  # the flat rows really took the full sort
        assert int((ours[3:] > 0).sum(-1).min()) > TOP_P_CANDIDATES


def test_draws_follow_the_distribution():
    cfg = GenerateConfig(do_sample=True, temperature=0.9, top_p=0.9, top_k=12)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 2
    p = distribution(logits, cfg)[0]
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(2))
    draws = next_tokens(logits.expand(n, -1), cfg, u)
    freq = torch.bincount(draws, minlength=40).float() / n
    assert bool((freq[p == 0] == 0).all())  # never a token outside top-k / top-p
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / n).sqrt().max())  # within ~4 std


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = logits_batch(50)
    cfg = GenerateConfig()
    assert torch.equal(next_tokens(logits, cfg, None), logits.argmax(-1))
    tok = torch.tensor([0, 5, 7, 9, 11, 49])
    torch.testing.assert_close(token_logprobs(logits, tok, 0.5),
                               (logits / 0.5).log_softmax(-1).gather(1, tok[:, None]).squeeze(1))


def test_uniform_streams_depend_on_seed_and_sequence_only():
    a = sequence_uniforms(3, [0, 1, 2, 3], 6)
    assert torch.equal(sequence_uniforms(3, [2, 0], 6), a[[2, 0]])
    assert not torch.equal(sequence_uniforms(4, [0], 6), a[:1])
    assert float(a.min()) >= 0 and float(a.max()) < 1 and len(set(a.flatten().tolist())) == a.numel()


def test_config_rejects_nonsense():
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(batch_size=0),
                dict(do_sample=True, temperature=0.0), dict(precision="int8"), dict(num_return_sequences=0)):
        with pytest.raises(ValueError):
            GenerateConfig(**bad)
    assert GenerateConfig(stop_strings="###").stop_strings == ("###",)


def test_greedy_is_torch_argmax_with_ties_to_the_lowest_id():
    """Greedy takes max's indices (faster on CPU than argmax): the same ids, ties included, as transformers'
    torch.argmax."""
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1))
    logits[0, [7, 4000]] = 50.0  # a tie: the lowest id wins
    logits[1, [4999, 3]] = 60.0
    logits[2] = 0.0  # all equal: id 0
    got = next_tokens(logits, GenerateConfig(), None)
    assert torch.equal(got, torch.argmax(logits, dim=-1))
    assert got[:3].tolist() == [7, 3, 0]
