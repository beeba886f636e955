"""Perplexity and bits per byte of general text, with a sliding window.

The text is tokenised once and preceded by one prefix token (BOS, else EOS; as lm-eval's rolling
log-likelihood), so every text token is predicted. Windows hold at most `max_length` tokens; the first
window scores all its tokens, each next window ends `stride` tokens later and scores only its last
`stride` tokens, with the rest of the window as context (Hugging Face's "perplexity of fixed-length
models" recipe). stride < max_length: a smaller stride gives each token more context and costs more.

  nll              total negative log-likelihood (nats) of the N text tokens
  token_perplexity exp(nll / N)
  bits_per_byte    nll / ln 2 / (UTF-8 bytes of the text)      (tokenizer-independent: compare models)
  word_perplexity  exp(nll / words), words = whitespace-separated pieces (WikiText convention)

Files: plain text (`.txt`, `.raw`, WikiText; CRLF read as LF), or JSONL with a "text" field per line
(documents joined by a blank line); `.gz` is read transparently. `max_chars` scores a prefix (quick runs).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunelab.data.formats import DataError
from tunelab.evaluate.checkers import iter_jsonl, open_text


def load_text(path: str | Path, max_chars: int | None = None) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix in (".jsonl", ".json"):
        docs = []
        for lineno, obj in iter_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: needs a string field 'text'")
            docs.append(obj["text"])
        text = "\n\n".join(docs)
    else:
        with open_text(path) as f:
            text = f.read()  # universal newlines: CRLF -> LF
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise DataError(f"{path}: no text")
    return text


def window_plan(n_seq: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of n_seq tokens, position 0 being
    the prefix: window tokens are [begin, end), targets [first, end); every position 1..n_seq-1 is a target
    exactly once, with at least one token of context."""
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1]; got stride={stride}, max_length={max_length}")
    plan, prev_end, end = [], 1, min(max_length, n_seq)
    while True:
        begin = max(0, end - max_length)
        plan.append((begin, end, prev_end))
        if end >= n_seq:
            return plan
        prev_end, end = end, min(end + stride, n_seq)


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], *, max_length: int, stride: int, batch_size: int = 4,
                       precision: str = "auto", device: torch.device | None = None,
                       progress: bool = True) -> tuple[float, int]:
    """(sum of -log p(token) over ids[1:], number of tokens scored) with the window plan above."""
    from tunelab.core.precision import autocast_context

    device = device or next(model.parameters()).device
    plan = window_plan(len(ids), max_length, stride)
    seq = torch.tensor(ids, dtype=torch.long)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(plan), batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        chunk = plan[start: start + batch_size]
        width = max(e - b for b, e, _ in chunk)
        inp = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (b, e, _) in enumerate(chunk):
            inp[row, : e - b] = seq[b:e]
            mask[row, : e - b] = 1
        with autocast_context(device, precision):
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
        for row, (b, e, first) in enumerate(chunk):
            # the logit at window position p (absolute b + p) predicts absolute token b + p + 1
            pred = logits[row, first - 1 - b: e - 1 - b].float()  # [e - first, V]
            target = seq[first:e].to(pred.device)
            total += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
            count += e - first
    model.train(was_training)
    return total, count


def perplexity(model, tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 4, precision: str = "auto", progress: bool = True) -> dict:
    from tunelab.evaluate.multiple_choice import model_max_length

    max_length = max_length or min(model_max_length(model), 1024)
    stride = stride or max(max_length // 2, 1)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("no tokens to score")
    nll, n = sliding_window_nll(model, [prefix, *ids], max_length=max_length, stride=stride, batch_size=batch_size,
                                precision=precision, progress=progress)
    n_bytes = len(text.encode("utf-8"))
    n_words = len([w for w in re.split(r"\s+", text) if w])
    return {"token_perplexity": math.exp(min(nll / n, 700.0)), "bits_per_byte": nll / math.log(2) / n_bytes,
            "word_perplexity": math.exp(min(nll / max(n_words, 1), 700.0)), "nll": nll, "n_tokens": n,
            "n_bytes": n_bytes, "n_words": n_words, "max_length": max_length, "stride": stride}
