"""Prompts to token ids, and batches of similar length, left-padded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from tunelab.data.encode import encode_prompt

Prompt = Union[str, Sequence[int], Sequence[dict]]  # raw text | token ids | chat messages


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: chat messages ([{"role", "content"}, ...]) through the chat template with the
    assistant generation prompt (as training renders them); raw text with the tokenizer's own special tokens;
    token ids as given."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(list(tokenizer(p)["input_ids"]))
        elif len(p) > 0 and isinstance(p[0], dict):
            out.append(encode_prompt(tokenizer, [dict(m) for m in p]))  # type: ignore[arg-type]
        else:
            out.append([int(i) for i in p])  # type: ignore[arg-type]
        if not out[-1]:
            raise ValueError(f"prompt {len(out) - 1} is empty")
    return out


def plan_batches(lengths: Sequence[int], prompts_per_batch: int) -> list[list[int]]:
    """Prompt indices grouped into batches of `prompts_per_batch`, longest first, so that each batch pads
    little and the largest (the peak of memory) runs first. Ties keep the input order (a stable sort)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s: s + prompts_per_batch] for s in range(0, len(order), prompts_per_batch)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, W], attention_mask [B, W], position_ids [B, W]) with padding on the left.

    Positions count real tokens only (0 at each row's first token, as transformers' generate derives them:
    cumsum(mask) - 1, 0 on padding), so a left-padded row computes what it would compute alone.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)
    return ids, mask, positions
