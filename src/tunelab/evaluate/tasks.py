"""Generation-based evaluation: batched greedy decoding, answers scored by the task's checker.

Generation stops on every id of `tunelab.data.turns.stop_token_ids` (the generation config's EOS ids, the
tokenizer's EOS, the chat template's end-of-turn token); the **stop rate** is the fraction of generations that
ended with one of them within `max_new_tokens` (a model that "never stops" scores low).
"""

from __future__ import annotations

import contextlib
import re

import torch
from tqdm.auto import tqdm

from tunelab.data.encode import encode_prompt
from tunelab.data.pipeline import EvalItem
from tunelab.data.turns import stop_token_ids


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def checker_for(task: str | None):
    if task is None:
        return lambda pred, ans: normalise(pred) == normalise(ans)
    from tunelab.data.builtin import get_task

    return get_task(task).check


def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 24,
                     batch_size: int = 32, device: torch.device | None = None, precision: str = "bf16",
                     progress: bool = True) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding; returns the decoded new text."""
    return generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=device, precision=precision, progress=progress)[0]


@torch.no_grad()
def generate_with_stops(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 24,
                        batch_size: int = 32, device: torch.device | None = None, precision: str = "bf16",
                        progress: bool = True, sampling: dict | None = None) -> tuple[list[str], list[bool]]:
    """Completions of chat prompts (greedy; `sampling`: `generate` kwargs such as temperature, top_p, top_k) and,
    for each, whether it ended with a stop id (module docstring)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sort by length so each batch pads little; restore the order at the end.
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: dict[int, str] = {}
    stopped: dict[int, bool] = {}
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress,
                      leave=False):
        idx = order[start: start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            decoding = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **decoding,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=stops or None)
        for row, i in enumerate(idx):
            new = out[row, width:]
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
            # [new tokens]: after a stop, generate pads (often with the EOS id itself), so "any stop id" is exact
            stopped[i] = bool(stops) and bool(torch.isin(new, torch.tensor(stops, device=new.device)).any())
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))], [stopped[i] for i in range(len(prompts))]


def exact_match(model, tokenizer, items: list[EvalItem], *, max_new_tokens: int = 24, batch_size: int = 32,
                precision: str = "bf16", progress: bool = True, checks: list | None = None) -> dict:
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
