"""Format rewards: does the completion look the way the prompt asked (regex, required tags)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tunelab.rewards.base import Reward, RewardOptions, register_reward


class RegexOptions(RewardOptions):
    pattern: str = Field(..., description="Python regular expression.")
    mode: str = Field("search", pattern="^(search|fullmatch)$", description="search anywhere, or match the whole "
                      "completion (surrounding whitespace stripped).")
    reward: float = Field(1.0, description="Score when the pattern matches (0 otherwise).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


@register_reward("regex")
class Regex(Reward):
    """`reward` when the completion matches `pattern` (DeepSeek-R1's format reward is
    `^<think>.*?</think>\\s*<answer>.*?</answer>$` in fullmatch mode), else 0."""

    Config = RegexOptions
    description = "regular-expression format reward"

    def __init__(self, config=None, **context):
        super().__init__(config, **context)
        self.pattern = re.compile(self.config.pattern, re.DOTALL)

    def score(self, prompts, completions, refs, **info):
        match = self.pattern.fullmatch if self.config.mode == "fullmatch" else self.pattern.search
        return [self.config.reward if match(c.strip() if self.config.mode == "fullmatch" else c) else 0.0
                for c in completions]


class TagsOptions(RewardOptions):
    tags: list[str] = Field(default_factory=lambda: ["think", "answer"], description="Tag names, in order.")


@register_reward("tags")
class Tags(Reward):
    """Fraction of the required `<tag>...</tag>` pairs present exactly once, in the given order."""

    Config = TagsOptions
    description = "required <tag>...</tag> sections"

    def score(self, prompts, completions, refs, **info):
        out = []
        for c in completions:
            pos, ok = 0, 0
            for tag in self.config.tags:
                open_, close = f"<{tag}>", f"</{tag}>"
                i = c.find(open_, pos)
                j = c.find(close, i + len(open_)) if i >= 0 else -1
                if i >= 0 and j >= 0 and c.count(open_) == 1 and c.count(close) == 1:
                    ok += 1
                    pos = j + len(close)
            out.append(ok / max(len(self.config.tags), 1))
        return out
