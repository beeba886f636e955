"""Generation-based evaluation: greedy answers from the generation engine (tunelab.generate), scored by the task's
checker.

Generation stops on every id of `tunelab.data.turns.stop_token_ids` (the generation config's EOS ids, the
tokenizer's EOS, the chat template's end-of-turn token); the **stop rate** is the fraction of generations that
ended with one of them within `max_new_tokens` (a model that "never stops" scores low).
"""

from __future__ import annotations

import re

from tunelab.data.pipeline import EvalItem
from tunelab.data.turns import stop_token_ids
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
    """Greedy completions of chat prompts; returns the decoded new text in the prompts' order."""
    return generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               precision=precision, progress=progress)[0]


def generate_with_stops(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 24,
                        batch_size: int = 32, precision: str = "auto", progress: bool = True,
                        sampling: dict | None = None) -> tuple[list[str], list[bool]]:
    """Completions of chat prompts through the generation engine (greedy; `sampling`: temperature, top_p, top_k,
    seed) and, for each, whether it ended with a stop id (module docstring): length-sorted batches, left padding."""
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision,
                         stop_token_ids=tuple(stops) if stops else None, do_sample=bool(sampling), **(sampling or {}))
    out = generate(model, tokenizer, prompts, cfg, progress=progress)
    return out.texts, [c.finish_reason == "stop" for c in out.completions]


def exact_match(model, tokenizer, items: list[EvalItem], *, max_new_tokens: int = 24, batch_size: int = 32,
                precision: str = "auto", progress: bool = True, checks: list | None = None) -> dict:
    """Fraction of items whose greedy answer the checker accepts, the stop rate (module docstring), and a few
    samples to read.

    `checks` (one `check(prediction, reference) -> bool` per item) overrides the task checkers; user files
    with per-line checkers (tunelab.evaluate.checkers) use it.
    """
    preds, stopped = generate_with_stops(model, tokenizer, [it.messages for it in items],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision,
                                         progress=progress)
    if checks is None:
        checks = [checker_for(it.task) for it in items]
    correct = []
    for it, pred, check in zip(items, preds, checks):
        correct.append(bool(check(pred, it.answer)))
    samples = [{"prompt": it.messages[-1]["content"], "answer": it.answer, "prediction": p, "correct": c}
               for it, p, c in list(zip(items, preds, correct))[:8]]
    return {"exact_match": sum(correct) / max(len(correct), 1), "n": len(correct),
            "stop_rate": sum(stopped) / max(len(stopped), 1), "samples": samples}
