"""One packed forward per prompt (objectives/packed_groups.py) gives the log-probs and gradients of the plain
per-row forward: groups of rows sharing a left-padded prompt, completions of different lengths."""

from __future__ import annotations

import pytest
import torch

from tunelab.objectives.packed_groups import pack, packable, shared_prompts
from tunelab.objectives.rl_base import completion_logps


def group_batch(vocab: int, group: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts (lengths 5 and 3, left-padded to 5) x `group` completions (lengths 1..4, right-padded)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (5,), generator=g), torch.randint(3, vocab, (3,), generator=g)]
    lengths = [[4, 1, 3], [2, 4, 4]]
    p_ids, p_mask, c_ids, c_att = [], [], [], []
    for p, lens in zip(prompts, lengths):
        for n in lens[:group]:
            p_ids.append(torch.cat([torch.full((5 - len(p),), 2), p]))
            p_mask.append(torch.cat([torch.zeros(5 - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)]))
            c_ids.append(torch.cat([torch.randint(3, vocab, (n,), generator=g), torch.full((4 - n,), 2)]))
            c_att.append(torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(4 - n, dtype=torch.long)]))
    b = {"prompt_ids": torch.stack(p_ids), "prompt_mask": torch.stack(p_mask), "completion_ids": torch.stack(c_ids),
         "completion_attention": torch.stack(c_att)}
    b["completion_mask"] = b["completion_attention"].clone()
    b["input_ids"] = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    b["attention_mask"] = torch.cat([b["prompt_mask"], b["completion_attention"]], 1)
    return b


def test_pack_lays_each_prompt_out_once():
    batch = group_batch(50)
    inverse = shared_prompts(batch)
    assert inverse is not None and inverse.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    packed = pack(batch, inverse)
    # prompt 5 + completions (4-1)+(1-1)+(3-1) = 10 tokens; prompt 3 + (2-1)+(4-1)+(4-1) = 10 tokens
    assert packed.input_ids.shape == (2, 10)
    assert packed.input_ids.numel() < batch["input_ids"].numel()
    row = int(inverse[0])
    assert packed.position_ids[row].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6]
    keep = packed.keep[row, 0]
    assert keep[8, :5].all() and keep[8, 8] and not keep[8, 5:8].any()  # the 3rd branch: prompt + itself only
    distinct = {k: v[[0, 3]] for k, v in batch.items()}
    assert shared_prompts(distinct) is None  # nothing shared: the plain forward


@pytest.mark.parametrize("attn", ["sdpa", "eager", "tunelab"])
def test_packed_logps_and_gradients_equal_the_plain_forward(attn):
    from tiny import build_tiny_model

    from tunelab.train.attention import register

    register()
    model = build_tiny_model(64, attn_implementation=attn)
    model.eval()  # no dropout: both passes see the same function
    batch = group_batch(64)
    assert packable(model, 32)
    w = torch.randn(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(1))
    mask = batch["completion_mask"].float()
    grads, values, shapes = [], [], []
    model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    for packed in (True, False):
        model.zero_grad()
        logps, entropy = completion_logps(model, batch, temperature=0.7, with_entropy=True, pack=packed)
        (logps * mask * w).sum().backward()
        values.append((logps * mask, entropy * mask))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert shapes == [(2, 10), (6, 9)]  # one packed row per prompt; the plain forward's [B, P + C]
    diff = (values[0][0] - values[1][0]).abs().max().item()
    ent = (values[0][1] - values[1][1]).abs().max().item()
    gdiff = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    print(f"{attn}: max |logp diff| {diff:.2e}, entropy {ent:.2e}, gradient (relative to max) {gdiff:.2e}")
    assert diff < 1e-5 and ent < 1e-5 and gdiff < 1e-5
    assert values[0][0].abs().sum() > 0 and grads[1].abs().sum() > 0


def test_bf16_autocast_moves_by_rounding_only():
    from tiny import build_tiny_model

    model = build_tiny_model(64)
    model.eval()
    batch = group_batch(64)
    mask = batch["completion_mask"].float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = completion_logps(model, batch, pack=True)[0] * mask
        b = completion_logps(model, batch, pack=False)[0] * mask
    diff = (a - b).abs().max().item()
    print(f"bf16 autocast: max |logp diff| packed vs plain {diff:.2e} (logps of magnitude {b.abs().max():.1f})")
    assert diff < 5e-2


def test_not_packed_where_the_mask_would_not_hold():
    from tiny import build_tiny_model

    assert not packable(build_tiny_model(64, attn_implementation="flex_attention"), 32)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                               sliding_window=16))
    assert packable(mistral, 16) and not packable(mistral, 17)  # a row wider than the window: plain forward
