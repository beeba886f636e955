"""Multiple choice by log-likelihood: each choice is scored as a continuation of the question.

For a question q with choices c_1..c_k the model scores LL_i = sum_t log p(token_t | q, earlier tokens of c_i)
over the tokens of " c_i" after the context "Question: q\\nAnswer:" (the zero-shot format of lm-evaluation-
harness' ARC task). Two accuracies:
  acc       argmax_i LL_i                        (raw log-likelihood: favours short choices)
  acc_norm  argmax_i LL_i / len(c_i)  (chars)    (length-normalised, as lm-eval's acc_norm)
Tokenisation follows lm-eval's `_encode_pair` (trailing spaces of the context move to the continuation;
the continuation's tokens are those of context+continuation after the context's), so the log-likelihoods
match lm-eval's on the same model (tested).

Files (JSONL), either ARC / CommonsenseQA-shaped:
  {"question": {"stem": "...", "choices": [{"label": "A", "text": "..."}, ...]}, "answerKey": "A"}
or flat:
  {"question": "...", "choices": ["...", "..."], "answer": 1}     (answer: index, or a label / choice text)
Every malformed line is reported with file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunelab.data.formats import DataError
from tunelab.evaluate.checkers import iter_jsonl

PROMPT = "Question: {question}\nAnswer:"


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    labels: list[str] | None = None
    origin: str = ""


def _parse_mc(obj: dict, where: str) -> MCItem:
    q = obj.get("question")
    if isinstance(q, dict):  # ARC / CommonsenseQA
        stem, raw_choices, key = q.get("stem"), q.get("choices"), obj.get("answerKey")
    else:
        stem, raw_choices = q, obj.get("choices")
        key = obj.get("answer", obj.get("label", obj.get("answerKey")))
    if not isinstance(stem, str) or not stem.strip():
        raise DataError(f"{where}: needs a question (field 'question' string, or 'question.stem')")
    if not isinstance(raw_choices, list) or len(raw_choices) < 2:
        raise DataError(f"{where}: needs a list of at least 2 choices ('choices' or 'question.choices')")
    texts, labels = [], []
    for j, c in enumerate(raw_choices):
        if isinstance(c, str):
            texts.append(c)
            labels.append("ABCDEFGHIJ"[j] if j < 10 else str(j))
        elif isinstance(c, dict) and isinstance(c.get("text"), str):
            texts.append(c["text"])
            labels.append(str(c.get("label", "ABCDEFGHIJ"[j] if j < 10 else j)))
        else:
            raise DataError(f"{where}: choice {j} must be a string or an object with a 'text' field")
    if isinstance(key, bool) or key is None:
        raise DataError(f"{where}: needs the correct answer ('answerKey', or 'answer' as index or label)")
    if isinstance(key, int):
        answer = key
    elif isinstance(key, str) and key in labels:
        answer = labels.index(key)
    elif isinstance(key, str) and key in texts:
        answer = texts.index(key)
    else:
        raise DataError(f"{where}: answer {key!r} is neither a choice label ({', '.join(labels)}) nor an index")
    if not 0 <= answer < len(texts):
        raise DataError(f"{where}: answer index {answer} out of range for {len(texts)} choices")
    return MCItem(stem.strip(), texts, answer, labels, where)


def load_mc_file(path: str | Path, n: int | None = None) -> list[MCItem]:
    items = []
    for lineno, obj in iter_jsonl(path):
        items.append(_parse_mc(obj, f"{path}:{lineno}"))
        if n is not None and len(items) >= n:
            break
    if not items:
        raise DataError(f"{path}: no records")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def model_max_length(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or default)


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   precision: str = "auto", device: torch.device | None = None, progress: bool = True,
                   max_length: int | None = None) -> list[tuple[float, int, bool]]:
    """For each (context, continuation): (sum of log p over the continuation's tokens, its token count,
    whether every continuation token is the greedy argmax). Batched with right padding, longest first."""
    from tunelab.core.precision import autocast_context

    device = device or next(model.parameters()).device
    max_length = max_length or model_max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id
    seqs = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation for context {context[-40:]!r}")
        if not ctx:
            ctx = [prefix_id]  # something to condition the first token on
        full = (ctx + cont)[-(max_length + 1):]  # keep the end; inputs are all but the last token
        seqs.append((full[:-1], cont))
    was_training = model.training
    model.eval()
    out: dict[int, tuple[float, int, bool]] = {}
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for start in tqdm(range(0, len(order), batch_size), desc="log-likelihood", unit="batch", disable=not progress,
                      leave=False):
        idx = order[start: start + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            inp = seqs[i][0]
            ids[row, : len(inp)] = torch.tensor(inp)
            mask[row, : len(inp)] = 1
        with autocast_context(device, precision):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
        for row, i in enumerate(idx):
            inp, cont = seqs[i]
            n = len(cont)
            # positions len(inp)-n .. len(inp)-1 predict the n continuation tokens
            lp = torch.log_softmax(logits[row, len(inp) - n: len(inp)].float(), dim=-1)  # [n, V]
            target = torch.tensor(cont, device=lp.device)
            token_lp = lp.gather(1, target[:, None])[:, 0]
            greedy = bool((lp.argmax(-1) == target).all())
            out[i] = (float(token_lp.sum()), n, greedy)
    model.train(was_training)
    return [out[i] for i in range(len(seqs))]


def multiple_choice(model, tokenizer, items: list[MCItem], *, batch_size: int = 16, precision: str = "auto",
                    progress: bool = True, prompt: str = PROMPT) -> dict:
    """acc (raw log-likelihood) and acc_norm (per character of the choice) over `items`."""
    requests, owner = [], []
    for k, it in enumerate(items):
        context = prompt.format(question=it.question)
        for c in it.choices:
            requests.append((context, " " + c))
            owner.append(k)
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, precision=precision, progress=progress)
    per_item: list[list[float]] = [[] for _ in items]
    for k, (ll, _, _) in zip(owner, lls):
        per_item[k].append(ll)
    raw_ok = norm_ok = 0
    samples = []
    for it, ll in zip(items, per_item):
        raw_pick = max(range(len(ll)), key=lambda j: ll[j])
        norm = [v / max(len(c), 1) for v, c in zip(ll, it.choices)]
        norm_pick = max(range(len(ll)), key=lambda j: norm[j])
        raw_ok += raw_pick == it.answer
        norm_ok += norm_pick == it.answer
        if len(samples) < 8:
            samples.append({"question": it.question, "answer": it.choices[it.answer], "pick": it.choices[raw_pick],
                            "pick_norm": it.choices[norm_pick], "loglikelihoods": ll})
    n = len(items)
    return {"acc": raw_ok / max(n, 1), "acc_norm": norm_ok / max(n, 1), "n": n,
            "chance": sum(1 / len(it.choices) for it in items) / max(n, 1), "samples": samples}
