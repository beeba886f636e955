"""A recipe's `rewards:` list as one scorer: each reward's scores, their weighted sum, verifier accuracy, and
failures counted, never fatal.

A reward that raises on a batch is asked again one completion at a time; each completion it still fails on
(an exception, or a value that is not a finite number or None) scores 0 and is counted: a warning names the
reward and the first error, and `rewards/<name>/errors` counts them in metrics.jsonl (iterate: `reward_errors`
in samples.json). The run goes on. A reward that raises `PartialScores` (the judge, for replies without a score)
has said which completions failed: its values are kept and its failures counted, nothing is asked again.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from tunelab.data.prompts import PromptItem, require_answers
from tunelab.recipe.rewards import RewardSpec
from tunelab.rewards.base import PartialScores, Reward, build_reward
from tunelab.train.rollout import Completion, RewardScores

log = logging.getLogger(__name__)


def weighted_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, K] rewards of K functions and [K] weights -> [N]: sum_k w_k r_k over the functions that scored the
    completion (NaN entries skipped, TRL's nansum); NaN where none did."""
    total = (per_func * weights.to(per_func).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))


class RewardSet:
    """The rewards of a run (names made unique: `math`, `math_2`, ...) and their weights."""

    def __init__(self, rewards: list[Reward], weights: list[float], names: list[str] | None = None):
        if not rewards:
            raise ValueError("no rewards: give at least one")
        self.rewards, self.weights = rewards, torch.tensor(weights, dtype=torch.float32)
        names = names or [r.name for r in rewards]
        seen: dict[str, int] = {}
        self.names = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            self.names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        self.error_totals = {n: 0 for n in self.names}

    @classmethod
    def from_specs(cls, specs: list[RewardSpec], **context: Any) -> RewardSet:
        """The one builder of a reward list (a recipe's `rewards:` for on-line RL, `iterate.rewards:` for rounds):
        each spec's reward built with its options and the caller's `context` (tokenizer, precision, device,
        `policy`: a callable returning the current model, for the judge's `model: policy`), named as the spec
        names it, weighted by its `weight`."""
        rewards = [build_reward(spec.name, spec.options(), **context) for spec in specs]
        return cls(rewards, [spec.weight for spec in specs], [spec.name for spec in specs])

    def check(self, items: list[PromptItem]) -> None:
        """Refuse data a reward cannot score (a verifier without reference answers), before any training."""
        for name, r in zip(self.names, self.rewards):
            if r.needs_answer:
                require_answers(items, f"the reward {name!r}")

    def __call__(self, items: list[PromptItem], completions: list[Completion]) -> RewardScores:
        prompts = [it.text for it in items]
        texts = [c.text for c in completions]
        refs = [it.answer for it in items]
        info = {"tasks": [it.task for it in items], "completion_ids": [c.token_ids for c in completions],
                "lengths": [len(c.token_ids) for c in completions],
                "truncated": [c.finish_reason == "length" for c in completions],
                "messages": [list(it.messages) for it in items]}
        n = len(texts)
        per_func = torch.full((n, len(self.rewards)), float("nan"))
        errors: dict[str, int] = {}
        for k, (name, reward) in enumerate(zip(self.names, self.rewards)):
            values, failed = self._score_one(name, reward, prompts, texts, refs, info)
            per_func[:, k] = torch.tensor(values, dtype=torch.float32)
            if failed:
                errors[name] = failed
                self.error_totals[name] += failed
        correct = None
        verifiers = [k for k, r in enumerate(self.rewards) if r.verifier]
        if verifiers:
            col = per_func[:, verifiers[0]]
            correct = torch.where(torch.isnan(col), col, (col >= 1.0 - 1e-6).float())
        return RewardScores(per_func, weighted_rewards(per_func, self.weights), list(self.names), correct, errors)

    def _score_one(self, name: str, reward: Reward, prompts, texts, refs, info) -> tuple[list[float], int]:
        try:
            try:
                out, unscored, why = reward.score(prompts, texts, refs, **info), [], ""
            except PartialScores as partial:  # the reward named its failures (scored 0): counted, not asked again
                out, unscored, why = partial.values, partial.failed, str(partial)
            if len(out) != len(texts):
                raise ValueError(f"returned {len(out)} scores for {len(texts)} completions")
            values = [_value(v) for v in out]
            if unscored:
                self._warn(name, len(unscored), len(texts), why)
            return values, len(unscored)
        except Exception as first:  # noqa: BLE001 - a reward never stops the run: isolate the failing completions
            values, failed, message = [], 0, f"{type(first).__name__}: {first}"
            for i in range(len(texts)):
                one = {k: [v[i]] for k, v in info.items()}
                try:
                    got = reward.score([prompts[i]], [texts[i]], [refs[i]], **one)
                    values.append(_value(got[0]))
                except Exception as e:  # noqa: BLE001
                    values.append(0.0)
                    failed += 1
                    message = f"{type(e).__name__}: {e}"
            if failed:
                self._warn(name, failed, len(texts), message)
            return values, failed

    def _warn(self, name: str, failed: int, n: int, message: str) -> None:
        log.warning("reward %r failed on %d of %d completions (scored 0; %d so far in this run): %s",
                    name, failed, n, self.error_totals[name] + failed, message)


def _value(v) -> float:
    """A reward's value as a float: None -> NaN (not applicable); anything not a finite number raises."""
    if v is None:
        return float("nan")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"reward value {v!r} is not finite")
    return f
