"""Batches: padding encoded examples into tensors, and the deterministic order of the training data.

The order of examples is a pure function of (seed, epoch): a seeded permutation per epoch. Optimizer
step k of a run consumes the k-th window of `global_batch` examples of that order, and process r of
a multi-process run takes its own slice of each window. Resuming at step k therefore needs only k,
and one process with grad_accum=2 sees exactly the examples that two processes with grad_accum=1 do.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from tunelab.data.encode import IGNORE_INDEX


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


#: per-pair reference log-probs an encoded preference example may carry (tunelab.objectives.reference_cache)
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _all_or_none(examples: list[dict], keys: tuple[str, ...], what: str) -> bool:
    """True when every example carries `keys`, False when none does; a mix is an error (never a silent fallback)."""
    have = [all(k in e for k in keys) for e in examples]
    if all(have):
        return True
    if any(have):
        raise ValueError(f"some examples of the batch carry {what} and some do not")
    return False


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded: [B, T_max].

    Examples that carry `loss_weights` (one float per token, aligned with `labels`: weight t scales the loss
    of the label at t) give a `loss_weights` [B, T_max] fp32 tensor too, 0 on padding.
    """
    ids = pad_sequences([e["input_ids"] for e in examples], pad_id)
    labels = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX)
    mask = pad_sequences([[1] * len(e["input_ids"]) for e in examples], 0)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if _all_or_none(examples, ("loss_weights",), "per-token loss_weights"):
        w = torch.zeros(labels.shape, dtype=torch.float32)
        for i, e in enumerate(examples):
            w[i, : len(e["loss_weights"])] = torch.tensor(e["loss_weights"], dtype=torch.float32)
        out["loss_weights"] = w
    return out


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* tensors, each [B, T_max] and padded to one shared width.

    Examples that carry precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`: one float
    each, see `tunelab.objectives.reference_cache`) give them as [B] fp32 tensors too; a batch that mixes
    cached and uncached pairs is an error (it would silently fall back to a live reference). Pairs with a
    `margin` (reward models) give `margin` [B] fp32; a batch mixing pairs with and without one is an error.
    """
    width = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples)
    out = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] + [pad_id] * (width - len(e[f"{side}_input_ids"])) for e in examples]
        labels = [e[f"{side}_labels"] + [IGNORE_INDEX] * (width - len(e[f"{side}_labels"])) for e in examples]
        mask = [[1] * len(e[f"{side}_input_ids"]) + [0] * (width - len(e[f"{side}_input_ids"])) for e in examples]
        out[f"{side}_input_ids"] = torch.tensor(ids, dtype=torch.long)
        out[f"{side}_labels"] = torch.tensor(labels, dtype=torch.long)
        out[f"{side}_attention_mask"] = torch.tensor(mask, dtype=torch.long)
    if _all_or_none(examples, REFERENCE_KEYS, "cached reference log-probs"):
        for k in REFERENCE_KEYS:
            out[k] = torch.tensor([e[k] for e in examples], dtype=torch.float32)
    if _all_or_none(examples, ("margin",), "a margin"):
        out["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return out


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence lengths into rows of `capacity` tokens (indices per row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def document_layout(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each document of packed rows sits, for attention computed document by document.

    rows: the token count of each document of each row, in row order (a row's padding tail counts as a document
    of its own); every row sums to `width`. With S documents, the longest L tokens, and flat position
    p = row * width + column:
      document_index [S, L] long: the flat position of each document's t-th token (t < its length; the rest
                                 repeat its first token's position, slots whose output nobody reads)
      document_slot  [rows * width] long: the slot s * L + t that flat position p occupies.
    """
    lengths = [n for row in rows for n in row]
    longest = max(lengths)
    index = torch.empty((len(lengths), longest), dtype=torch.long)
    slot = torch.empty(len(rows) * width, dtype=torch.long)
    s, flat = 0, 0
    for row in rows:
        for n in row:
            index[s] = flat
            index[s, :n] = torch.arange(flat, flat + n)
            slot[flat: flat + n] = torch.arange(s * longest, s * longest + n)
            s, flat = s + 1, flat + n
    return index, slot


def collate_packed(examples: list[dict], pad_id: int, pack_length: int | None = 512) -> dict[str, torch.Tensor]:
    """Pack a micro-batch's examples into rows without cross-document attention.

    Each row concatenates whole examples; `position_ids` restart at 0 for each one and no 2-D attention
    mask is passed, which makes transformers build a block-diagonal causal mask (its packed-sequence
    path), so no token attends across examples. The first label of every example is masked, exactly as
    the causal shift ignores it when unpacked: loss and gradients equal the padded batch's.
    `pack_length=None` is padding-free: one row of exactly the micro-batch's tokens.
    Shapes: input_ids / labels / position_ids / real_token_mask [rows, width] (and `loss_weights` when the
    examples carry them, placed like the labels), plus `document_layout`'s document_index [S, L] and
    document_slot [rows * width], with which tunelab's attention attends document by document instead of over
    the whole row under the block-diagonal mask (other attention implementations ignore them).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    width = sum(lengths) if pack_length is None else max(max(lengths), pack_length)
    rows = pack_rows(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    weighted = _all_or_none(examples, ("loss_weights",), "per-token loss_weights")
    weights = torch.zeros((len(rows), width), dtype=torch.float32) if weighted else None
    documents: list[list[int]] = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at: at + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, at + 1: at + n] = torch.tensor(examples[i]["labels"][1:])
            if weights is not None:
                weights[r, at + 1: at + n] = torch.tensor(examples[i]["loss_weights"][1:], dtype=torch.float32)
            pos[r, at: at + n] = torch.arange(n)
            real[r, at: at + n] = 1
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding tail is a document of its own
        documents.append([lengths[i] for i in members] + ([width - at] if at < width else []))
    index, slot = document_layout(documents, width)
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "real_token_mask": real,
           "document_index": index, "document_slot": slot}
    if weights is not None:
        out["loss_weights"] = weights
    return out


COLLATORS = {"sft": collate_sft, "preference": collate_preference, "packed": collate_packed}


def make_collator(batch_kind: str, data_cfg) -> Callable[[list[dict], int], dict[str, torch.Tensor]]:
    """The training collator for SFT batches: one row per micro-batch under `data.padding_free`, rows of
    `data.pack_length` under `data.packing`, else padding to the longest."""
    if batch_kind == "sft" and getattr(data_cfg, "padding_free", False):
        return partial(collate_packed, pack_length=None)
    if batch_kind == "sft" and getattr(data_cfg, "packing", False):
        return partial(collate_packed, pack_length=data_cfg.pack_length)
    return COLLATORS[batch_kind]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class StepSampler:
    """Which example indices each process uses for each micro-batch of optimizer step `step` (0-based).

    A global batch is micro_batch * grad_accum * world_size examples; epochs are consumed as a stream,
    so a window may straddle two epochs. The last partial window of the run is never needed because
    the number of steps is derived from full windows.
    """

    def __init__(self, n_examples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if n_examples < 1:
            raise ValueError("no training examples")
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = (
            n_examples, micro_batch, grad_accum, world_size, rank, seed)
        self.global_batch = micro_batch * grad_accum * world_size
        self._cache: dict[int, list[int]] = {}

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, int(self.n * epochs) // self.global_batch)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_order(self.n, self.seed, epoch)}
        return self._cache[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        out = []
        for pos in range(start, start + self.global_batch):
            epoch, i = divmod(pos, self.n)
            out.append(self._order(epoch)[i])
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches for `step`.

        The global window is laid out as [accum][world][micro]: micro-batch a of process r is
        window[(a * world + r) * micro : ... + micro], so grad_accum=2 on one process and two processes
        with grad_accum=1 both sum over the same set of examples.
        """
        window = self.global_indices(step)
        out = []
        for a in range(self.accum):
            s = (a * self.world + self.rank) * self.micro
            out.append(window[s: s + self.micro])
        return out
