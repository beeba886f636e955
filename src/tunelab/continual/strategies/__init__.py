"""Anti-forgetting strategies of continual fine-tuning, one file each (paper in its docstring).

`tunelab.continual.strategies.base` has the interface and the registry; `list_strategies()` imports every
strategy module of this package.
"""

from tunelab.continual.strategies.base import (
    Strategy,
    StrategyError,
    StrategyObjective,
    StrategyOptions,
    StreamContext,
    build_strategy,
    get_strategy_class,
    list_strategies,
    register_strategy,
)

__all__ = ["Strategy", "StrategyError", "StrategyObjective", "StrategyOptions", "StreamContext", "build_strategy",
           "get_strategy_class", "list_strategies", "register_strategy"]
