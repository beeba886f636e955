"""Reference models of the preference and KL-anchored objectives, and the model-side log-prob helpers.

`pair_logps` runs chosen and rejected in one concatenated forward pass; `model_sequence_logps` gives
per-sequence summed response log-probs. A `Reference` yields the reference log-probs of a batch:
`AdapterDisabledReference` (the policy's own base under a PEFT adapter: no second copy in memory) or
`FrozenCopyReference` (a separate frozen model: the initial weights, or a teacher).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from tunelab.core.constants import IGNORE_INDEX
from tunelab.core.unwrap import unwrap_model
from tunelab.objectives.preference_losses import sequence_logps
from tunelab.train.token_logps import causal_lm_hidden, chunked_token_logps


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.size(1) == length:
        return x
    return F.pad(x, (0, length - x.size(1)), value=value)


def concatenate_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack chosen over rejected (right-padded to a common length) for one forward pass.

    Returns (input_ids, attention_mask, labels), each [2B, T]; rows [:B] are chosen, [B:] rejected.
    Padding: input id 0 (never attended, never a target), attention 0, label -100.
    """
    t = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
    ids = torch.cat(
        [_pad_right(batch["chosen_input_ids"], t, 0), _pad_right(batch["rejected_input_ids"], t, 0)], dim=0
    )
    att = torch.cat(
        [_pad_right(batch["chosen_attention_mask"], t, 0), _pad_right(batch["rejected_attention_mask"], t, 0)], dim=0
    )
    lab = torch.cat(
        [_pad_right(batch["chosen_labels"], t, IGNORE_INDEX), _pad_right(batch["rejected_labels"], t, IGNORE_INDEX)],
        dim=0,
    )
    return ids, att, lab


def model_sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (sum_logps [N], n_tokens [N]) of the target tokens (labels != -100; logits[:, t]
    predict labels[:, t + 1]). The head is applied to the target positions only, chunk by chunk inside the
    log-softmax (train/token_logps.py: no [N, T, V] logits, no fp32 copy of them); a model whose head is not a
    plain Linear gets `sequence_logps` of its full logits (the same values)."""
    res = causal_lm_hidden(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if res is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return sequence_logps(out.logits, labels)
    hidden, weight = res  # [N, T, d], [V, d]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # [N, T-1]
    logps, _ = chunked_token_logps(hidden[:, :-1][mask], weight, targets[mask])  # [M] the target tokens only
    per_token = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)
    return per_token.sum(-1), mask.sum(-1)


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Chosen and rejected in ONE concatenated forward: (pol_c, pol_r, n_c, n_r), each [B]."""
    ids, att, lab = concatenate_pair(batch)
    logps, n = model_sequence_logps(model, ids, att, lab)
    b = batch["chosen_input_ids"].size(0)
    return logps[:b], logps[b:], n[:b], n[b:]


@runtime_checkable
class Reference(Protocol):
    """Where reference log-probs come from (never differentiated)."""

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of a preference batch: (ref_chosen [B], ref_rejected [B])."""
        ...

    def logps_of(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Summed target log-probs of arbitrary right-padded sequences: [N] (used by KTO)."""
        ...


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off for the reference pass; every module's own training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


class _ReferenceBase:
    def _model_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        raise NotImplementedError

    def logps_of(self, input_ids, attention_mask, labels) -> torch.Tensor:
        return self._model_logps(input_ids, attention_mask, labels)

    def logps(self, batch):
        ids, att, lab = concatenate_pair(batch)
        out = self._model_logps(ids, att, lab)
        b = batch["chosen_input_ids"].size(0)
        return out[:b], out[b:]


class AdapterDisabledReference(_ReferenceBase):
    """The policy's own base model: a PEFT model with its adapter switched off (`disable_adapter()`).

    Runs under `torch.no_grad()` and in eval mode (dropout off); the adapter and the training flags
    are restored afterwards. Accepts a PeftModel or a wrapper (DDP, ...) whose `.module` is one.
    """

    def __init__(self, model: torch.nn.Module):
        inner = unwrap_model(model)
        if not hasattr(inner, "disable_adapter"):
            raise TypeError("AdapterDisabledReference needs a peft PeftModel (no `disable_adapter` found)")
        self.model = inner

    def _model_logps(self, input_ids, attention_mask, labels):
        with torch.no_grad(), eval_mode(self.model), self.model.disable_adapter():
            return model_sequence_logps(self.model, input_ids, attention_mask, labels)[0]


class FrozenCopyReference(_ReferenceBase):
    """A separate, frozen reference model (e.g. the initial weights for full fine-tuning)."""

    def __init__(self, ref_model: torch.nn.Module):
        self.model = ref_model
        self.model.eval()
        self.model.requires_grad_(False)

    def _model_logps(self, input_ids, attention_mask, labels):
        with torch.no_grad():
            return model_sequence_logps(self.model, input_ids, attention_mask, labels)[0]


def default_reference(model: torch.nn.Module, ref: Reference | None) -> Reference:
    """`ref` if given; else the adapter-disabled policy when the model is a PEFT model; else an error."""
    if ref is not None:
        return ref
    try:
        return AdapterDisabledReference(model)
    except TypeError:
        raise ValueError(
            "this objective needs a reference model: pass `ref` (e.g. FrozenCopyReference) or train a PEFT adapter"
        ) from None


def mismatched_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's KL sequences: prompt of row i followed by the completion of row (i + shift) mod N.

    Prompt = the real tokens before a row's first target (label != -100); completion = the real
    tokens from that first target on, with their labels. Returns right-padded (ids, mask, labels).
    """
    n = input_ids.size(0)
    rows = []
    for i in range(n):
        j = (i + shift) % n
        real_i = attention_mask[i].bool()
        tgt_i = (labels[i] != IGNORE_INDEX).nonzero()
        start_i = int(tgt_i[0]) if len(tgt_i) else int(real_i.sum())
        tgt_j = (labels[j] != IGNORE_INDEX).nonzero()
        len_j = int(attention_mask[j].sum())
        start_j = int(tgt_j[0]) if len(tgt_j) else len_j
        ids = torch.cat([input_ids[i, :start_i], input_ids[j, start_j:len_j]])
        lab = torch.cat([torch.full((start_i,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device),
                         labels[j, start_j:len_j]])
        rows.append((ids, lab))
    t = max(len(r[0]) for r in rows)
    out_ids = input_ids.new_zeros((n, t))
    out_att = attention_mask.new_zeros((n, t))
    out_lab = labels.new_full((n, t), IGNORE_INDEX)
    for k, (ids, lab) in enumerate(rows):
        out_ids[k, : len(ids)] = ids
        out_att[k, : len(ids)] = 1
        out_lab[k, : len(lab)] = lab
    return out_ids, out_att, out_lab
