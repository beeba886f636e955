"""The Reward interface and registry.

A reward scores completions: `score(prompts, completions, refs, **info) -> list[float | None]`, one value per
completion, where `prompts` are the user messages, `refs` the reference answers (None where the data has none)
and `info` carries `tasks` (built-in task of each prompt, or None), `completion_ids`, `lengths` (completion
tokens), `truncated` (cut at the length limit) and `max_length` (rollout.max_completion_length). None means
"not applicable" (that reward is left out of this completion's weighted sum, as in TRL).

    @register_reward("regex", paper=None)
    class Regex(Reward):
        class Config(RewardOptions):
            pattern: str
        def score(self, prompts, completions, refs, **info): ...

`verifier = True` marks rewards that decide correctness (1.0 right, 0.0 wrong): the rollout's `accuracy` is the
first verifier's. `needs_answer = True` rewards refuse prompts without a reference before training starts.
Adding a reward is one new file in this package (the registry imports every module of it on first lookup).

A reward that scored a batch but could not score some of its completions (a judge reply without a number) raises
`PartialScores` with every value (0 where it failed) and the failed indices: the scorer (`scoring.RewardSet`)
keeps the values and counts the failures, without asking again completion by completion as it does after any
other exception (for a judge that would mean judging the whole batch a second time).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from tunelab.core.registry import Registry


class PartialScores(ValueError):
    """Some completions of a scored batch could not be scored: `values` holds one value per completion (0 for
    those), `failed` the indices of the failed ones; the message says why."""

    def __init__(self, message: str, values: list[float | None], failed: list[int]):
        super().__init__(message)
        self.values, self.failed = values, failed


class RewardOptions(BaseModel):
    """Base for reward configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Reward:
    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]] = RewardOptions
    verifier: ClassVar[bool] = False
    needs_answer: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, config: BaseModel | None = None, **context: Any):
        self.config = config if config is not None else self.Config()
        self.context = context  # what the runner offers: tokenizer, device, precision

    def score(self, prompts: list[str], completions: list[str], refs: list[str | None],
              **info: Any) -> list[float | None]:
        raise NotImplementedError


_REWARDS: Registry = Registry("reward", package="tunelab.rewards", skip=("base", "scoring", "math_answers"))


def register_reward(name: str, paper: str | None = None):
    return _REWARDS.register(name, paper)


def get_reward_class(name: str) -> type[Reward]:
    return _REWARDS.get(name)


def list_rewards() -> dict[str, type[Reward]]:
    return _REWARDS.sorted()


def build_reward(name: str, options: dict[str, Any], **context: Any) -> Reward:
    cls = get_reward_class(name)
    return cls(cls.Config.model_validate(options), **context)
