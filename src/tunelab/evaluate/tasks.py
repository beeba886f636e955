"""Generation-based evaluation: greedy answers from the generation engine, scored by the task's checker."""

from __future__ import annotations

import re

from tunelab.data.pipeline import EvalItem
from tunelab.generate import GenerateConfig, generate


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def checker_for(task: str | None):
    if task is None:
        return lambda pred, ans: normalise(pred) == normalise(ans)
    from tunelab.data.builtin import get_task

    return get_task(task).check


def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 24,
                     batch_size: int = 32, precision: str = "auto", progress: bool = True) -> list[str]:
    """Greedy completions of chat prompts through the generation engine (tunelab.generate): length-sorted
    batches, left padding, stop at EOS / end of turn; returns the decoded new text in the prompts' order."""
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision)
    return generate(model, tokenizer, prompts, cfg, progress=progress).texts


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
