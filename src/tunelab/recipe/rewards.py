"""One entry of a recipe's reward list (`rewards:` for on-line RL, `iterate.rewards:` for self-improvement rounds)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RewardSpec(BaseModel):
    """One reward: `name` picks a registered reward (`tunelab rewards`), `weight` scales it in the sum; its other
    keys are validated by that reward's Config."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    def options(self) -> dict[str, Any]:
        """The reward's own options (name and weight removed), for its Config."""
        return {k: v for k, v in self.model_dump().items() if k not in ("name", "weight")}
