"""A user's reward function, named `module:function` (or `path/to/file.py:function`).

TRUSTED CODE: the named module is imported and run in the training process, like any Python you execute;
nothing from the data is ever evaluated. The function has TRL's reward-function signature, so TRL reward
functions work unchanged:

    def my_reward(prompts, completions, completion_ids, answer, task, **kwargs) -> list[float | None]

`prompts` are the user messages, `completions` the decoded completions, `answer` the references (None where the
data has none), `task` the built-in task names; `options` from the recipe are passed as keyword arguments too.
None means "not applicable" for that completion.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator

from tunelab.rewards.base import Reward, RewardOptions, register_reward


def resolve_function(ref: str) -> Callable[..., Any]:
    """`pkg.module:name` or `file.py:name` -> the callable; ValueError saying what is missing."""
    if ":" not in ref:
        raise ValueError(f"{ref!r}: expected module:function or path/to/file.py:function")
    mod_name, _, attr = ref.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"{ref!r}: file {path} not found")
        spec = importlib.util.spec_from_file_location(f"tunelab_user_reward_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"{ref!r}: cannot import {mod_name}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{ref!r}: {mod_name} has no function {attr!r}")
    return fn


class FunctionOptions(RewardOptions):
    function: str = Field(..., description="module:function or path/to/file.py:function (trusted code).")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the function.")
    verifier: bool = Field(False, description="Its scores are correctness (1 right, 0 wrong): counts as accuracy.")

    @field_validator("function")
    @classmethod
    def _resolves(cls, v: str) -> str:
        resolve_function(v)
        return v


@register_reward("function")
class UserFunction(Reward):
    """A user's `module:function` (TRL's reward-function signature; trusted code)."""

    Config = FunctionOptions
    description = "user function module:function (trusted code)"

    def __init__(self, config=None, **context):
        super().__init__(config, **context)
        self.fn = resolve_function(self.config.function)
        self.verifier = self.config.verifier  # type: ignore[misc]

    def score(self, prompts, completions, refs, **info):
        return list(self.fn(prompts=prompts, completions=completions, completion_ids=info.get("completion_ids"),
                            answer=refs, task=info.get("tasks"), **self.config.options))
