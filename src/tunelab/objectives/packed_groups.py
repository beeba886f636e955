"""One forward pass per prompt for the completions that share it (on-line RL's groups), instead of one per completion.

A rollout micro-batch holds B rows [left-padded prompt | right-padded completion], and the G completions of a
prompt repeat the same prompt tokens. `pack` lays each distinct prompt out ONCE, followed by the completions that
share it, in one row (a tree: the prompt is the trunk, each completion a branch):

    row u = [ prompt_u (L tokens) | completion a (c_a - 1 tokens) | completion b (c_b - 1 tokens) | ... | pad ]
    positions 0 .. L-1,            L .. L + c_a - 2,                L .. L + c_b - 2

with a 4-D boolean attention mask in which a prompt token sees the earlier prompt tokens, and a completion token
sees the whole prompt and its own completion's earlier tokens (never another branch; padding sees only itself,
so it stays finite). A completion's last token predicts nothing and is left out. Every kept token then attends
to exactly the keys, at exactly the positions, it attends to in its own unpacked row, so the log-probs equal the
unpacked forward's (tests/rl/test_packed_groups.py: fp32 values and gradients to 1e-5; under bf16 autocast they
move by rounding, since the matmuls have other shapes), while the prompt's activations, kept for the backward
pass, exist once per prompt instead of G times. For the GRPO benchmark (8 completions of <= 12 tokens after a
~62-token prompt, micro-batches of 16) a micro-batch's forward runs 316 tokens instead of 16 x 74 = 1184.

`packed_forward` gives the packed forward's arguments and, for each row i and completion position t, where the
output predicting completion token t is: the prompt's last token's for t = 0, completion token t - 1's after
it. Where packing does not apply (no shared prompt, PEFT prompt learning, sliding-window or non-standard
attention, a batch without prompt columns), `packable` says so and the caller runs the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.core.unwrap import unwrap_model, unwrap_peft
from tunelab.generate.forward import is_prompt_learning

# attention implementations that take a custom 4-D mask as it is (sdpa and tunelab's: boolean; eager: additive)
_MASKED_ATTENTION = ("sdpa", "eager", "tunelab")


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, W] one row per distinct prompt
    position_ids: torch.Tensor  # [R, W]
    keep: torch.Tensor  # [R, 1, W, W] bool: query may attend to key
    source: torch.Tensor  # [B, C] long: flat index (row * W + column) of the position predicting completion token t
    first_column: int  # the smallest column any `source` points to (logits are computed from there on)


def shared_prompts(batch: dict) -> torch.Tensor | None:
    """Row -> distinct-prompt index [B] when some rows of the micro-batch share their prompt, else None."""
    if not all(k in batch for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_attention")):
        return None
    mask = batch["prompt_mask"]
    key = torch.cat([batch["prompt_ids"] * mask, mask], 1)  # padding ids do not matter, the mask does
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    return inverse if uniq.size(0) < key.size(0) else None


def packable(model: torch.nn.Module, width: int) -> bool:
    """Whether the model takes a packed batch: a causal LM whose every layer attends fully (no sliding window
    narrower than the packed row, no hybrid layers) through an attention that honours a custom 4-D mask."""
    inner = unwrap_model(model)
    if is_prompt_learning(inner):  # virtual tokens are inserted by PEFT in front of every row
        return False
    cfg = getattr(unwrap_peft(inner), "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in _MASKED_ATTENTION:
        return False
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and width > int(window):
        return False
    types = getattr(cfg, "layer_types", None)
    return not types or all(t == "full_attention" for t in types)


def pack(batch: dict, inverse: torch.Tensor, pad_id: int = 0) -> Packed:
    """Lay out each distinct prompt once, then its completions (module docstring); `inverse` from `shared_prompts`."""
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"].bool()
    c_ids, c_len = batch["completion_ids"], batch["completion_attention"].sum(1)  # [B, C], [B]
    b, c = c_ids.shape
    device = c_ids.device
    rows: list[list[torch.Tensor]] = []  # per packed row: its token segments
    source = torch.zeros(b, c, dtype=torch.long)
    branches: list[list[tuple[int, int]]] = []  # per packed row: (start, length) of each completion's branch
    n_rows = int(inverse.max()) + 1
    order = [[i for i in range(b) if int(inverse[i]) == u] for u in range(n_rows)]
    lengths, prompt_lengths = [], []
    for u, members in enumerate(order):
        prompt = p_ids[members[0]][p_mask[members[0]]]  # [L] the real prompt tokens
        segs, offset, br = [prompt], prompt.numel(), []
        for i in members:
            n = max(int(c_len[i]) - 1, 0)  # completion tokens fed in: all but the last
            segs.append(c_ids[i, :n])
            br.append((offset, n))
            offset += n
        rows.append(segs)
        branches.append(br)
        lengths.append(offset)
        prompt_lengths.append(prompt.numel())
    width = max(lengths)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros(n_rows, width, dtype=torch.long, device=device)
    keep = torch.eye(width, dtype=torch.bool, device=device).repeat(n_rows, 1, 1)  # [R, W, W]: padding sees itself
    first = width
    for u, members in enumerate(order):
        plen, total = prompt_lengths[u], lengths[u]
        ids[u, :total] = torch.cat(rows[u])
        pos[u, :plen] = torch.arange(plen, device=device)
        keep[u, :plen, :plen] = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
        for i, (start, n) in zip(members, branches[u]):
            pos[u, start:start + n] = torch.arange(plen, plen + n, device=device)
            keep[u, start:start + n, :plen] = True
            keep[u, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            # t = 0 is predicted by the prompt's last token, t >= 1 by completion token t - 1 (column start + t - 1)
            cols = torch.cat([torch.tensor([plen - 1]), torch.arange(start, start + c - 1)])
            source[i] = u * width + cols.clamp(max=width - 1)
            first = min(first, plen - 1)
    return Packed(ids, pos, keep.unsqueeze(1), source.to(device), first)


def packed_forward(model: torch.nn.Module, batch: dict, inverse: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The model's forward arguments for the packed rows, and the [B, C] index of the output row predicting each
    completion token in the forward's output [R, K, X] viewed as [R * K, X] (X: the vocabulary, or the hidden size
    when the caller bypasses the head); positions past a completion's end point at some other row (mask them)."""
    packed = pack(batch, inverse)
    r, w = packed.input_ids.shape
    cfg = unwrap_peft(unwrap_model(model)).config
    mask = packed.keep
    if getattr(cfg, "_attn_implementation", None) == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    # an index tensor, not an int: the kept hidden states are then a contiguous copy (rl_base's note)
    keep_cols = torch.arange(packed.first_column, w, device=packed.input_ids.device)
    kwargs = dict(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False,
                  logits_to_keep=keep_cols)
    k = w - packed.first_column  # output column j is packed column first_column + j
    src = packed.source
    return kwargs, (src // w) * k + (src % w - packed.first_column)
