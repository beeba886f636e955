"""Verifier rewards: 1.0 when the completion's answer is right, 0.0 otherwise (`verifier = True`: the rollout's
accuracy is the first verifier's)."""

from __future__ import annotations

from pydantic import Field

from tunelab.data.builtin import get_task
from tunelab.data.builtin.base import normalize
from tunelab.rewards.base import Reward, RewardOptions, register_reward
from tunelab.rewards.math_answers import answers_match, extract_answer


@register_reward("task")
class TaskChecker(Reward):
    """The built-in task's own answer checker (`tunelab tasks`); prompts from files (no task): exact match with
    the reference after whitespace normalisation."""

    verifier = True
    needs_answer = True
    description = "built-in task checker (exact match for files)"

    def score(self, prompts, completions, refs, **info):
        tasks = info.get("tasks") or [None] * len(completions)
        out = []
        for text, ref, task in zip(completions, refs, tasks):
            ok = get_task(task).check(text, ref) if task else normalize(text) == normalize(ref)
            out.append(1.0 if ok else 0.0)
        return out


class MathOptions(RewardOptions):
    require_boxed: bool = Field(False, description="Only a \\boxed{} answer counts (format discipline).")


@register_reward("math")
class MathAnswer(Reward):
    """Math final answers (GSM8K `#### N`, `\\boxed{}`, numbers with units and separators; math-verify where
    installed): 1.0 when the completion's final answer equals the reference's."""

    Config = MathOptions
    verifier = True
    needs_answer = True
    description = "math answer (#### N, \\boxed{}, numbers; math-verify)"

    def score(self, prompts, completions, refs, **info):
        from tunelab.rewards.math_answers import boxed

        out = []
        for text, ref in zip(completions, refs):
            pred = boxed(text) if self.config.require_boxed else extract_answer(text)
            out.append(1.0 if answers_match(pred, extract_answer(ref) if ref is not None else None) else 0.0)
        return out
