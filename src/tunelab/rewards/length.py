"""Length rewards: a linear length penalty and DAPO's soft overlong punishment (token counts)."""

from __future__ import annotations

from pydantic import Field, model_validator

from tunelab.rewards.base import Reward, RewardOptions, register_reward


class LengthOptions(RewardOptions):
    target: int = Field(0, ge=0, description="Tokens allowed free of penalty.")
    per_token: float = Field(0.01, ge=0, description="Penalty per token beyond `target`.")


@register_reward("length")
class LengthPenalty(Reward):
    """-per_token * max(0, |y| - target), |y| the completion's tokens."""

    Config = LengthOptions
    description = "linear length penalty"

    def score(self, prompts, completions, refs, **info):
        return [-self.config.per_token * max(0, n - self.config.target) for n in info["lengths"]]


class OverlongOptions(RewardOptions):
    max_length: int = Field(..., ge=1, description="L_max: the hard limit (usually rollout.max_completion_length).")
    buffer: int = Field(..., ge=1, description="L_cache: the soft zone before L_max where the penalty ramps up.")

    @model_validator(mode="after")
    def _fits(self) -> "OverlongOptions":
        if self.buffer > self.max_length:
            raise ValueError("buffer must not exceed max_length")
        return self


@register_reward("overlong", paper="https://arxiv.org/abs/2503.14476")
class OverlongPenalty(Reward):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13):
    0 for |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the buffer; -1 beyond L_max."""

    Config = OverlongOptions
    description = "DAPO soft overlong penalty"

    def score(self, prompts, completions, refs, **info):
        hi, buf = self.config.max_length, self.config.buffer
        out = []
        for n in info["lengths"]:
            if n <= hi - buf:
                out.append(0.0)
            elif n <= hi:
                out.append(((hi - buf) - n) / buf)
            else:
                out.append(-1.0)
        return out
