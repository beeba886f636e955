"""A round's samples: the current model answers each prompt `num_generations` times through the one generation
engine (`tunelab.generate`), the rewards score every answer (`tunelab.rewards.scoring.RewardSet`, the same scorer
as on-line RL), and STaR asks again with the answer as a hint where no sample was right.

`samples.jsonl` holds one line per prompt: its chat, reference, completions, each reward's scores, the weighted
reward, the verifier's verdict, and (STaR) which completions were rationalized.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tunelab.data.prompts import PromptItem
from tunelab.generate import GenerateConfig, generate
from tunelab.iterate.select import PromptSamples
from tunelab.recipe.iterate import IterateConfig
from tunelab.rewards.scoring import RewardSet


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


@dataclass
class RoundSamples:
    groups: list[PromptSamples]
    stats: dict[str, Any]


def sample_round(model, tokenizer, items: list[PromptItem], it: IterateConfig, rewards: RewardSet | None, *,
                 seed: int, precision: str) -> RoundSamples:
    """Generate `it.num_generations` completions per prompt with `model`, score them, rationalize (STaR)."""
    t0 = time.perf_counter()
    cfg = GenerateConfig(max_new_tokens=it.max_completion_length, do_sample=True, temperature=it.temperature,
                         top_p=it.top_p, top_k=it.top_k, num_return_sequences=it.num_generations,
                         stop_strings=tuple(it.stop_strings), batch_size=it.generation_batch_size, seed=seed,
                         precision=precision)
    out = generate(model, tokenizer, [list(i.messages) for i in items], cfg, progress=True)
    n = it.num_generations
    groups = [PromptSamples(list(item.messages), item.answer, [c.text for c in out.completions[k * n:(k + 1) * n]],
                            [math.nan] * n) for k, item in enumerate(items)]
    gen_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if rewards is not None:
        _score(groups, items, out.completions, rewards, n)
    score_s = time.perf_counter() - t1
    rationalized = 0
    if it.strategy == "star" and it.rationalize and rewards is not None:
        rationalized = _rationalize(model, tokenizer, items, groups, it, rewards, seed=seed, precision=precision)
    stats = {"prompts": len(items), "completions": sum(len(g.completions) for g in groups),
             "generation_s": gen_s, "scoring_s": score_s, "new_tokens": out.stats.new_tokens,
             "rationalized": rationalized, **sample_stats(groups)}
    if rewards is not None:
        stats["reward_errors"] = dict(rewards.error_totals)
    stats["sampling_s"] = time.perf_counter() - t0
    return RoundSamples(groups, stats)


def _score(groups: list[PromptSamples], items: list[PromptItem], completions, rewards: RewardSet, n: int) -> None:
    expanded = [items[c.prompt_index] for c in completions]
    scores = rewards(expanded, completions)
    total = scores.total.tolist()
    correct = scores.correct.tolist() if scores.correct is not None else [math.nan] * len(total)
    for k, g in enumerate(groups):
        sl = slice(k * n, (k + 1) * n)
        g.rewards = total[sl]
        g.correct = _nan_to_none(correct[sl])
        g.per_reward = {name: scores.per_func[sl, j].tolist() for j, name in enumerate(scores.names)}


def _rationalize(model, tokenizer, items: list[PromptItem], groups: list[PromptSamples], it: IterateConfig,
                 rewards: RewardSet, *, seed: int, precision: str) -> int:
    """STaR (Zelikman et al. 2022, sec. 3.2): a prompt none of whose samples is right is asked again with its
    answer as a hint; a hinted completion the verifier accepts joins the prompt's samples (marked
    `rationalized`), to be trained on WITHOUT the hint. Returns how many were accepted."""
    wrong = [k for k, g in enumerate(groups) if not any(c is not None and c >= 1.0 for c in g.correct)]
    if not wrong:
        return 0
    hinted = []
    for k in wrong:
        msgs = [dict(m) for m in items[k].messages]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] = it.hint_template.format(prompt=msgs[last]["content"], answer=items[k].answer)
        hinted.append(msgs)
    cfg = GenerateConfig(max_new_tokens=it.max_completion_length, do_sample=True, temperature=it.temperature,
                         top_p=it.top_p, top_k=it.top_k, stop_strings=tuple(it.stop_strings),
                         batch_size=it.generation_batch_size, seed=seed + 7919, precision=precision)
    out = generate(model, tokenizer, hinted, cfg)
    # scored against the ORIGINAL prompts: the trained record has no hint, and a judge must not see it either
    scores = rewards([items[k] for k in wrong], out.completions)
    accepted = 0
    correct = scores.correct.tolist() if scores.correct is not None else []
    for row, (k, c) in enumerate(zip(wrong, out.completions)):
        if row < len(correct) and correct[row] >= 1.0:
            g = groups[k]
            g.completions.append(c.text)
            g.rewards.append(float(scores.total[row]))
            g.correct.append(1.0)
            g.rationalized.append(True)
            for j, name in enumerate(scores.names):
                g.per_reward.setdefault(name, []).append(float(scores.per_func[row, j]))
            accepted += 1
    return accepted


def sample_stats(groups: list[PromptSamples]) -> dict[str, float | None]:
    """Mean reward and sample accuracy (the first verifier) over a round's completions."""
    rewards = [r for g in groups for r in g.rewards if not math.isnan(r)]
    verdicts = [c for g in groups for c in g.correct if c is not None]
    return {"mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "sample_accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
            "pass_at_k": (sum(any(c is not None and c >= 1.0 for c in g.correct) for g in groups) / len(groups)
                          if verdicts and groups else None)}


def group_to_json(g: PromptSamples) -> dict[str, Any]:
    """One line of samples.jsonl (NaN scores as null)."""
    return {"messages": g.messages, "answer": g.answer, "completions": g.completions,
            "rewards": _nan_to_none(g.rewards), "correct": g.correct,
            "per_reward": {k: _nan_to_none(v) for k, v in g.per_reward.items()},
            "rationalized": g.rationalized}


def group_from_json(d: dict[str, Any]) -> PromptSamples:
    def nan(values):
        return [math.nan if v is None else float(v) for v in values]

    return PromptSamples(d["messages"], d.get("answer"), d["completions"], nan(d["rewards"]), d.get("correct") or [],
                         {k: nan(v) for k, v in (d.get("per_reward") or {}).items()}, d.get("rationalized") or [])

