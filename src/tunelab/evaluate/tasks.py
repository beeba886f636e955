"""Generation-based evaluation: batched greedy decoding, answers scored by the task's checker."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from tunelab.core.precision import autocast_context
from tunelab.data.encode import encode_prompt
from tunelab.data.pipeline import EvalItem


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def checker_for(task: str | None):
    if task is None:
        return lambda pred, ans: normalise(pred) == normalise(ans)
    from tunelab.data.builtin import get_task

    return get_task(task).check


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 24,
                     batch_size: int = 32, device: torch.device | None = None, precision: str = "auto",
                     progress: bool = True) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding; returns the decoded new text."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sort by length so each batch pads little; restore the order at the end.
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress,
                      leave=False):
        idx = order[start: start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with autocast_context(device, precision):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]


def exact_match(model, tokenizer, items: list[EvalItem], *, max_new_tokens: int = 24, batch_size: int = 32,
                precision: str = "auto", progress: bool = True, checks: list | None = None) -> dict:
    """Fraction of items whose greedy answer the checker accepts, plus a few samples to read.

    `checks` (one `check(prediction, reference) -> bool` per item) overrides the task checkers; user files
    with per-line checkers (tunelab.evaluate.checkers) use it.
    """
    preds = generate_answers(model, tokenizer, [it.messages for it in items], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, precision=precision, progress=progress)
    if checks is None:
        checks = [checker_for(it.task) for it in items]
    correct = []
    for it, pred, check in zip(items, preds, checks):
        correct.append(bool(check(pred, it.answer)))
    samples = [{"prompt": it.messages[-1]["content"], "answer": it.answer, "prediction": p, "correct": c}
               for it, p, c in list(zip(items, preds, correct))[:8]]
    return {"exact_match": sum(correct) / max(len(correct), 1), "n": len(correct), "samples": samples}
