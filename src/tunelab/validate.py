"""Recipe checks that need the plug-in registries: the layer above methods, objectives and selection.

`tunelab.recipe` validates shapes only (it imports nothing of tunelab but itself); the options of the
registered method, objective and selection scorer/selector, and the names of built-in tasks, are checked here,
each error naming the dotted recipe field; so is whether the method runs under a sharded `distributed.backend`
(its `capabilities.supports_sharding`). Commands load recipes with `load_validated_recipe`. `check_data_fits`
checks loaded data against the objective (runner.open_workspace calls it before any model work).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tunelab.core.registry import UnknownName
from tunelab.data.builtin import get_task
from tunelab.data.formats import detect_format
from tunelab.data.pipeline import load_spec_records
from tunelab.evaluate.heldout import is_pairs
from tunelab.methods.registry import Method, get_method_class, list_methods
from tunelab.objectives.base import Objective, get_objective_class
from tunelab.recipe import DatasetSpec, Recipe, RecipeError, format_validation_error, load_recipe
from tunelab.recipe.rewards import RewardSpec
from tunelab.rewards.base import get_reward_class
from tunelab.selection.registry import validate_select_config
from tunelab.train.backends import is_sharded


def validate_recipe(recipe: Recipe) -> Recipe:
    """Check `method`, `objective` and `data.select` options against their registered classes."""
    for section, getter, name, options in (
        ("method", get_method_class, recipe.method.name, recipe.method_options()),
        ("objective", get_objective_class, recipe.objective.name, recipe.objective_options()),
    ):
        try:
            cls = getter(name)
        except UnknownName as e:
            raise RecipeError(f"recipe field '{section}.name': {e}") from None
        try:
            cls.Config.model_validate(options)
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, prefix=section)) from None
    validate_rollout(recipe)
    validate_iterate(recipe)
    validate_sharding(recipe)
    if recipe.data.select is not None:
        try:
            validate_select_config(recipe.data.select)
        except ValueError as e:
            raise RecipeError(f"recipe field 'data.select': {e}") from None
    for name in ("train", "eval"):
        spec = getattr(recipe.data, name)
        if spec is not None and spec.builtin:
            try:
                get_task(spec.builtin)
            except KeyError as e:
                raise RecipeError(f"recipe field 'data.{name}.builtin': {e.args[0]}") from None
    return recipe


def check_data_fits(objective: Objective, method: Method, train_data: list[dict], spec: DatasetSpec) -> None:
    """The training data's format must be what the objective trains on (SFT examples or preference pairs), and a
    method that calibrates on SFT batches (CorDA, EVA, LoRA-GA) needs an SFT objective."""
    wants_pairs = objective.batch_kind == "preference"
    if wants_pairs and method.capabilities.needs_calibration:
        raise RecipeError(f"method {method.name!r} calibrates on SFT batches; objective {objective.name!r} trains "
                          "on preference pairs: choose another method or objective")
    pairs = is_pairs(train_data)
    if pairs == wants_pairs:
        return
    where = f"data.train ({spec.path or f'builtin:{spec.builtin}'})"
    fmt = spec.format if spec.format != "auto" else detect_format(load_spec_records(spec)[0].data)
    if wants_pairs:
        raise RecipeError(f"objective {objective.name!r} trains on preference pairs (format 'preference': prompt, "
                          f"chosen, rejected), but {where} is in format {fmt!r}; use pair data or an SFT objective")
    raise RecipeError(f"objective {objective.name!r} trains on SFT examples (formats alpaca, messages, "
                      f"prompt_completion, text), but {where} holds preference pairs (format {fmt!r}); use SFT data "
                      "or a preference objective (dpo, simpo, orpo, kto)")


def validate_rollout(recipe: Recipe) -> None:
    """On-line RL: an RL objective iff a rollout section; every reward known, its options valid; a group size the
    objective can use; online DPO's groups whole in a micro-batch."""
    objective = get_objective_class(recipe.objective.name)
    online = objective.batch_kind == "rollout"
    if online and recipe.rollout is None:
        raise RecipeError(f"recipe field 'rollout': objective {recipe.objective.name!r} learns from samples of the "
                          "policy: add a rollout section and rewards (docs/rl.md)")
    if recipe.rollout is not None and not online:
        raise RecipeError(f"recipe field 'rollout': objective {recipe.objective.name!r} trains on data, not "
                          "rollouts; use an RL objective (grpo, gspo, rloo, reinforce_pp, online_dpo) or remove "
                          "the rollout section")
    _check_rewards(recipe.rewards, "rewards")
    if recipe.rollout is None:
        return
    g = recipe.rollout.num_generations
    opts = objective.Config.model_validate(recipe.objective_options())
    need = objective(opts).min_group_size
    if g < need:
        raise RecipeError(f"recipe field 'rollout.num_generations': {recipe.objective.name} compares completions of "
                          f"the same prompt and needs at least {need} per prompt, got {g}")
    if recipe.objective.name == "online_dpo" and recipe.train.batch_size % g:
        raise RecipeError(f"recipe field 'train.batch_size': online_dpo pairs completions of one prompt inside a "
                          f"micro-batch: use a multiple of rollout.num_generations ({g})")



def _check_rewards(specs: list[RewardSpec], field: str) -> None:
    """Every reward of a list known, and its options valid for its Config (errors name `<field>.<i>`)."""
    for i, spec in enumerate(specs):
        try:
            cls = get_reward_class(spec.name)
        except UnknownName as e:
            raise RecipeError(f"recipe field '{field}.{i}.name': {e}") from None
        try:
            cls.Config.model_validate(spec.options())
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, prefix=f"{field}.{i}")) from None


def validate_iterate(recipe: Recipe) -> None:
    """An `iterate:` section: every reward known and its options valid, the objective of the kind the strategy
    builds (SFT records or preference pairs), the rewards the strategy ranks with (a verifier for correct_only and
    STaR, an LLM judge on the policy for self-rewarding). Data checks (SPIN's human responses, a verifier's
    references) need the prompts: `check_iterate_prompts`."""
    it = recipe.iterate
    if it is None:
        return
    _check_rewards(it.rewards, "iterate.rewards")
    kind = get_objective_class(recipe.objective.name).batch_kind
    if it.builds_pairs and kind != "preference":
        raise RecipeError(f"recipe field 'objective.name': iterate strategy {it.strategy} trains on preference "
                          f"pairs; {recipe.objective.name!r} trains on {kind} batches (use "
                          f"{'spin' if it.strategy == 'spin' else 'dpo'})")
    if not it.builds_pairs and kind != "sft":
        raise RecipeError(f"recipe field 'objective.name': iterate strategy {it.strategy} trains on SFT records; "
                          f"{recipe.objective.name!r} trains on {kind} batches (use sft)")
    if it.strategy != "spin" and not it.rewards:
        raise RecipeError(f"recipe field 'iterate.rewards': strategy {it.strategy} ranks its samples by rewards: "
                          "give at least one (e.g. [{name: task}])")
    verifiers = [s.name for s in it.rewards if get_reward_class(s.name).verifier]
    if (it.rule == "correct_only" or it.strategy == "star") and not verifiers:
        raise RecipeError(f"recipe field 'iterate.rewards': {'star' if it.strategy == 'star' else 'correct_only'} "
                          "keeps the samples a verifier marks right: add one (task, math)")
    if it.strategy == "self_rewarding":
        judges = [s for s in it.rewards if s.name == "judge"]
        if not judges or any(s.options().get("model", "policy") != "policy" for s in judges):
            raise RecipeError("recipe field 'iterate.rewards': self_rewarding ranks samples by the model's own "
                              "judgement: add {name: judge, model: policy} (rubric: self_rewarding is the paper's)")
    if recipe.data.select is not None:
        raise RecipeError("recipe field 'data.select': iterate rounds build their own training data from "
                          "`data.train`'s prompts; remove data.select")


def check_iterate_prompts(recipe: Recipe, prompts: list) -> None:
    """The prompts an iterate recipe samples from (`tunelab.data.prompts.PromptItem`s) must carry what its
    strategy and rewards need: SPIN's chosen side is the human response, STaR's hint and a verifier's check the
    reference answer."""
    from tunelab.data.prompts import require_answers

    it = recipe.iterate
    assert it is not None
    spec = recipe.data.train
    where = spec.path or f"builtin:{spec.builtin}"
    if it.strategy == "spin":
        missing = sum(p.answer is None for p in prompts)
        if missing:
            raise RecipeError(f"iterate strategy spin needs human responses (SPIN's chosen side: a record's "
                              f"output / completion / answer, or a last assistant turn), but {missing} of "
                              f"{len(prompts)} prompts in data.train ({where}) have none; give SFT data with "
                              "responses, or use a strategy that scores its own samples (raft, iterative_dpo)")
    for i, s in enumerate(it.rewards):
        if get_reward_class(s.name).needs_answer:
            require_answers(prompts, f"the reward iterate.rewards.{i} ({s.name!r})")
    if it.strategy == "star" and it.rationalize:
        require_answers(prompts, "STaR's rationalization hint")


def validate_sharding(recipe: Recipe) -> None:
    """A sharded backend (fsdp, deepspeed) runs only the methods that declare `supports_sharding`: the others keep
    state per whole weight matrix (GaLore's projections, LIFT's and GMT's selections), step on their own (MeZO),
    re-draw what trains (LISA, COLA), or hold tensors FSDP2 cannot shard (QLoRA's NF4, prompt embeddings)."""
    backend = recipe.distributed.backend
    if not is_sharded(backend):
        return
    cls = get_method_class(recipe.method.name)
    method = cls(cls.Config.model_validate(recipe.method_options()))  # capabilities may depend on the options
    if not method.capabilities.supports_sharding:
        ok = sorted(n for n, c in list_methods().items() if c.capabilities.supports_sharding)
        raise RecipeError(f"recipe field 'method.name': {recipe.method.name!r} does not run under "
                          f"distributed.backend={backend} (it is not declared to support sharding); use "
                          f"distributed.backend=ddp, or one of: {', '.join(ok)}")


def load_validated_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """`tunelab.recipe.load_recipe` (YAML, overrides, shape) and then `validate_recipe`."""
    return validate_recipe(load_recipe(path, overrides))
