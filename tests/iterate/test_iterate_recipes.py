"""The shipped iterate recipes validate, and the strategy defaults are the papers'."""

from __future__ import annotations

import pytest

from tunelab.recipe.iterate import IterateConfig


@pytest.mark.parametrize("name,strategy,objective", [("raft", "raft", "sft"), ("iterative_dpo", "iterative_dpo", "dpo"),
                                                     ("spin", "spin", "spin"),
                                                     ("self_rewarding", "self_rewarding", "dpo")])
def test_shipped_iterate_recipes_validate(name, strategy, objective):
    from tunelab.commands._common import builtin_recipe_path
    from tunelab.validate import load_validated_recipe

    r = load_validated_recipe(builtin_recipe_path(name))
    assert r.iterate is not None and r.iterate.strategy == strategy and r.objective.name == objective
    assert r.model.name_or_path == "smollm2-135m-instruct"


@pytest.mark.parametrize("strategy,start,rule", [("raft", "previous", "best_of_k"), ("rest_em", "base", "correct_only"),
                                                 ("star", "base", "correct_only"),
                                                 ("iterative_dpo", "previous", "best_vs_worst"),
                                                 ("self_rewarding", "previous", "best_vs_worst"),
                                                 ("spin", "previous", "human_vs_generated")])
def test_strategy_defaults(strategy, start, rule):
    it = IterateConfig(strategy=strategy)
    assert (it.start_from, it.rule) == (start, rule)
    assert IterateConfig(strategy=strategy, continue_from="base").start_from == "base"


def test_iterate_and_rollout_do_not_combine():
    from tunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="does not combine"):
        load_recipe(None, ["iterate.strategy=raft", "rollout.num_generations=2", "rewards=[{name: task}]"])
