"""What a round keeps: selection rules over scored samples, and preference pairs. Pure functions on
`PromptSamples` (no model, no files), so each rule is tested on hand-made scores.

SFT rules (a list of (prompt index, completion index) kept, in prompt order):
  * `best_of_k`     RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767): per prompt, the completion with the
                    highest reward of its k (the first of equals), if it reaches `min_reward` (when set);
  * `threshold`     every completion whose reward is >= `threshold` (ReST's filtering step with a threshold);
  * `top_fraction`  the best `ceil(fraction * N)` of the round's N completions, over all prompts (RAFT's batch-level
                    ranking); ties broken by order;
  * `correct_only`  ReST-EM (Singh et al. 2023, https://arxiv.org/abs/2312.06585) and STaR: the completions the
                    verifier marks right (binary reward).
Then duplicates (the same text for the same prompt) are dropped and at most `max_per_prompt` are kept per prompt
(ReST-EM caps each problem's solutions so easy problems do not dominate).

Pairs:
  * `best_vs_worst`       iterative DPO (Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Xu et al. 2023,
                          https://arxiv.org/abs/2312.16682) and self-rewarding (Yuan et al. 2024,
                          https://arxiv.org/abs/2401.10020): chosen = the highest-rewarded completion, rejected = the
                          lowest; a prompt whose best and worst score the same (or read the same) gives no pair;
  * `human_vs_generated`  SPIN (Chen et al. 2024, https://arxiv.org/abs/2401.01335): chosen = the human response,
                          rejected = each generation of the previous model (none where it equals the human one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PromptSamples:
    """One prompt's completions this round and their scores (NaN: no reward applied)."""

    messages: list[dict]  # the chat up to the assistant turn ({"role", "content"} dicts)
    answer: str | None  # the reference / human response
    completions: list[str]
    rewards: list[float]  # weighted reward sum per completion
    correct: list[float | None] = field(default_factory=list)  # the first verifier: 1 right, 0 wrong, None: none
    per_reward: dict[str, list[float]] = field(default_factory=dict)  # each reward's scores
    rationalized: list[bool] = field(default_factory=list)  # STaR: completion generated with the hint

    def __post_init__(self) -> None:
        n = len(self.completions)
        if len(self.rewards) != n:
            raise ValueError(f"{len(self.rewards)} rewards for {n} completions")
        self.correct = self.correct or [None] * n
        self.rationalized = self.rationalized or [False] * n


def _ok(v: float) -> bool:
    return v is not None and not math.isnan(v)


def select_samples(groups: list[PromptSamples], rule: str, *, threshold: float = 1.0, top_fraction: float = 0.25,
                   min_reward: float | None = None, max_per_prompt: int | None = None) -> list[tuple[int, int]]:
    """(prompt index, completion index) of the kept completions; see the module docstring for each rule."""
    picked: list[tuple[int, int]] = []
    if rule == "best_of_k":
        for i, g in enumerate(groups):
            scored = [j for j, r in enumerate(g.rewards) if _ok(r)]
            if not scored:
                continue
            best = max(scored, key=lambda j: (g.rewards[j], -j))  # the first of equals
            if min_reward is None or g.rewards[best] >= min_reward:
                picked.append((i, best))
    elif rule == "threshold":
        picked = [(i, j) for i, g in enumerate(groups) for j, r in enumerate(g.rewards) if _ok(r) and r >= threshold]
    elif rule == "top_fraction":
        pool = [(g.rewards[j], i, j) for i, g in enumerate(groups) for j in range(len(g.completions))
                if _ok(g.rewards[j])]
        k = math.ceil(top_fraction * len(pool))
        best = sorted(pool, key=lambda t: (-t[0], t[1], t[2]))[:k]
        picked = sorted((i, j) for _, i, j in best)
    elif rule == "correct_only":
        picked = [(i, j) for i, g in enumerate(groups) for j, c in enumerate(g.correct) if c is not None and c >= 1.0]
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return _distinct_capped(groups, picked, max_per_prompt)


def _distinct_capped(groups: list[PromptSamples], picked: list[tuple[int, int]],
                     cap: int | None) -> list[tuple[int, int]]:
    kept: list[tuple[int, int]] = []
    seen: dict[int, set[str]] = {}
    for i, j in picked:
        texts = seen.setdefault(i, set())
        text = groups[i].completions[j].strip()
        if text in texts or (cap is not None and len(texts) >= cap):
            continue
        texts.add(text)
        kept.append((i, j))
    return kept


def best_vs_worst(groups: list[PromptSamples]) -> list[tuple[int, int, int]]:
    """(prompt index, chosen index, rejected index): each prompt's highest- and lowest-rewarded completions (the
    first of equals), when their rewards differ and their texts do."""
    pairs = []
    for i, g in enumerate(groups):
        scored = [j for j, r in enumerate(g.rewards) if _ok(r)]
        if len(scored) < 2:
            continue
        hi = max(scored, key=lambda j: (g.rewards[j], -j))
        lo = min(scored, key=lambda j: (g.rewards[j], j))
        if g.rewards[hi] > g.rewards[lo] and g.completions[hi].strip() != g.completions[lo].strip():
            pairs.append((i, hi, lo))
    return pairs


def human_vs_generated(groups: list[PromptSamples]) -> list[tuple[int, int]]:
    """(prompt index, completion index) of SPIN's rejected side: every generation that differs from the human
    response (the chosen side, `answer`); prompts without one are skipped (checked before the loop starts)."""
    return [(i, j) for i, g in enumerate(groups) if g.answer is not None for j, c in enumerate(g.completions)
            if c.strip() != g.answer.strip()]


def sft_record(group: PromptSamples, j: int) -> dict:
    """A kept completion as an SFT record in the `messages` format (`tunelab run` reads it as is)."""
    return {"messages": [*group.messages, {"role": "assistant", "content": group.completions[j]}]}


def pair_record(group: PromptSamples, chosen: str, rejected: str) -> dict:
    """A preference pair in the `preference` format: prompt (the chat), chosen and rejected responses."""
    return {"prompt": list(group.messages), "chosen": chosen, "rejected": rejected}


def judge_agreement(groups: list[PromptSamples], judge: str) -> dict[str, float | int | None]:
    """How often the judge's ranking agrees with the verifier's (self-rewarding, Yuan et al. 2024, report the
    judge's pairwise accuracy against human labels; here the verifier plays the human). Over every two
    completions of one prompt that the verifier separates (one right, one wrong): 1 if the judge scores the right
    one higher, 1/2 on a tie, 0 otherwise; `judge_agreement` is the mean, `judge_pairs` how many there were."""
    total, n = 0.0, 0
    for g in groups:
        scores = g.per_reward.get(judge)
        if scores is None:
            continue
        right = [j for j, c in enumerate(g.correct) if c is not None and c >= 1.0 and _ok(scores[j])]
        wrong = [j for j, c in enumerate(g.correct) if c is not None and c < 1.0 and _ok(scores[j])]
        for a in right:
            for b in wrong:
                n += 1
                total += 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
    return {"judge_agreement": total / n if n else None, "judge_pairs": n}
