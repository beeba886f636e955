"""Batched language-model passes that scorers share: per-token response losses, last-token hidden states,
next-token log-probabilities.

Sequences are sorted by length and right-padded per batch (little padding), run under autocast, and the
output projection is applied only at the positions needed: the model runs with its lm_head bypassed (as
the chunked SFT loss does), so [B, T, vocab] logits are never built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tunelab.core.precision import autocast_context
from tunelab.core.unwrap import unwrap_peft
from tunelab.data.encode import IGNORE_INDEX, _tokenize_with_mask, assistant_spans, render
from tunelab.data.formats import ChatExample, DataError
from tunelab.train.chunked_ce import _has_logit_postprocessing, _plain_lm_head


@dataclass
class ResponseInput:
    """Token ids of one example scored two ways; both score exactly the same answer tokens.

    cond = prompt (system, history, instruction, assistant header) + answer; uncond = a context without the
    instruction + the same answer token ids (concatenated as ids, so tokenisation cannot differ).
    """

    cond_ids: list[int]
    cond_start: int  # index of the first answer token in cond_ids
    uncond_ids: list[int]
    uncond_start: int

    @property
    def n_answer(self) -> int:
        return len(self.cond_ids) - self.cond_start


def response_input(tokenizer, ex: ChatExample, *, max_length: int, max_response_tokens: int,
                   unconditional: str = "empty_turn") -> ResponseInput:
    """Split the rendered chat into prompt tokens and the last assistant turn's tokens (the training target).

    The answer is cut to its first `max_response_tokens`, the prompt from the left to fit `max_length`.
    unconditional: `empty_turn` = the chat template with the system messages and an EMPTY user turn (same
    template tokens, no instruction); `raw` = one BOS (else EOS) token then the answer, as the IFD papers do.
    """
    text, spans = assistant_spans(tokenizer, ex.messages, ex.origin)
    ids, labels = _tokenize_with_mask(tokenizer, text, spans[-1:])
    targets = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not targets or targets[0] == 0:
        raise DataError(f"{ex.origin}: no response tokens to score")
    start, end = targets[0], targets[-1] + 1
    answer = ids[start:end][:max_response_tokens]
    prompt = ids[:start][-max(1, max_length - len(answer)):]
    if unconditional == "raw":
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context = [first]
    else:
        system = [m for m in ex.messages[:1] if m["role"] == "system"]
        rendered = render(tokenizer, system + [{"role": "user", "content": ""}], add_generation_prompt=True)
        context = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ResponseInput(prompt + answer, len(prompt), context + answer, len(context))


def _head(model) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    base = unwrap_peft(model)
    head = _plain_lm_head(base)
    name = next((n for n, m in base.named_children() if m is head), None) if head is not None else None
    if head is None or name is None or _has_logit_postprocessing(base):
        return None
    return base, name, head


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """(final hidden states [B, T, d], project: [n, d] -> logits [n, V] fp32). Without a plain lm_head the
    first item is the logits themselves and `project` is the identity (models that post-process logits)."""
    found = _head(model)
    if found is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits, lambda h: h.float()
    base, name, head = found
    setattr(base, name, torch.nn.Identity())
    try:
        hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, d]
    finally:
        setattr(base, name, head)
    return hidden, lambda h: head(h).float()


def batched(n_rows: list[int], batch_size: int, desc: str, progress: bool):
    """Batches of row indices, shortest first (so each batch pads little), with a progress bar."""
    order = sorted(range(len(n_rows)), key=lambda i: n_rows[i])
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)


@torch.no_grad()
def token_losses(model, rows: list[list[int]], starts: list[int], *, pad_id: int, batch_size: int,
                 precision: str = "auto", progress: bool = True, desc: str = "score") -> list[np.ndarray]:
    """Per-token cross-entropy of rows[i][starts[i]:] given everything before (fp32 numpy, one array per row).

    Token t is predicted from position t - 1, so starts[i] must be >= 1.
    """
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(rows)
    for idx in batched([len(r) for r in rows], batch_size, desc, progress):
        ids, mask = _pad([rows[i] for i in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        with autocast_context(device, precision):
            hidden, project = forward_hidden(model, ids, mask)
            for b, i in enumerate(idx):
                s, e = starts[i], len(rows[i])
                logits = project(hidden[b, s - 1: e - 1])  # [n_answer, V] predicting tokens s..e-1
                out[i] = F.cross_entropy(logits, ids[b, s:e], reduction="none").cpu().numpy()
    return out  # type: ignore[return-value]


@torch.no_grad()
def last_token_hidden(model, rows: list[list[int]], *, pad_id: int, batch_size: int, precision: str = "auto",
                      progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Final-layer hidden state of each row's last token: [N, d] float32 (RDS / Deita-style LM embeddings)."""
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(rows)
    found = _head(model)
    for idx in batched([len(r) for r in rows], batch_size, desc, progress):
        ids, mask = _pad([rows[i] for i in idx], pad_id)
        with autocast_context(device, precision):
            if found is None:
                hs = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                           output_hidden_states=True).hidden_states[-1]
            else:
                hs, _ = forward_hidden(model, ids.to(device), mask.to(device))
        for b, i in enumerate(idx):
            out[i] = hs[b, len(rows[i]) - 1].float().cpu().numpy()
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def next_token_logprobs(model, rows: list[list[int]], token_ids: list[int], *, pad_id: int, batch_size: int,
                        precision: str = "auto", progress: bool = True, desc: str = "judge") -> np.ndarray:
    """log p(token | row) for each candidate token after each row: [N, len(token_ids)] float64."""
    device = next(model.parameters()).device
    out = np.zeros((len(rows), len(token_ids)))
    cand = torch.tensor(token_ids, device=device)
    for idx in batched([len(r) for r in rows], batch_size, desc, progress):
        ids, mask = _pad([rows[i] for i in idx], pad_id)
        with autocast_context(device, precision):
            hidden, project = forward_hidden(model, ids.to(device), mask.to(device))
            last = torch.stack([hidden[b, len(rows[i]) - 1] for b, i in enumerate(idx)])  # [B, d]
            logp = torch.log_softmax(project(last), dim=-1)  # [B, V] fp32
        out[idx] = logp[:, cand].double().cpu().numpy()
    return out


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
