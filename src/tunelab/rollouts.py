"""On-line RL's batch source, assembled from a recipe (layer 5b, beside tunelab.assemble): prompts, the
generation engine as the sampler, the recipe's rewards as the scorer, and the objective's `prepare_rollouts`
(advantages, old and reference log-probs).

`load_rollout_prompts` reads and checks the prompts (a verifier reward refuses prompts without references)
before the run directory exists; `build_rollout_source` makes the `RolloutSource` the loop trains on.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tunelab.core.precision import autocast_context, resolve_precision
from tunelab.data.prompts import PromptItem, load_prompts, require_answers
from tunelab.generate import GenerateConfig, generate
from tunelab.objectives.rl_base import RLObjective
from tunelab.recipe import Recipe, RolloutConfig
from tunelab.rewards.base import get_reward_class
from tunelab.rewards.scoring import RewardSet
from tunelab.train.backends import Backend
from tunelab.train.rollout import Completion, RolloutSource, Sampler


def engine_sampler(tokenizer, *, precision: str) -> Sampler:
    """Sampling with tunelab's generation engine: KV cache, eval mode, every sequence its own seeded RNG stream
    (so a completion does not depend on the batch it ran in, and a resumed run samples the same)."""

    def sample(model, prompt_ids: list[list[int]], ro: RolloutConfig, seed: int,
               first_sequence: int = 0) -> list[Completion]:
        cfg = GenerateConfig(max_new_tokens=ro.max_completion_length, do_sample=True, temperature=ro.temperature,
                             top_p=ro.top_p, top_k=ro.top_k, num_return_sequences=ro.num_generations,
                             stop_strings=tuple(ro.stop_strings), batch_size=ro.generation_batch_size, seed=seed,
                             first_sequence=first_sequence, precision=precision)
        out = generate(model, tokenizer, prompt_ids, cfg)
        return [Completion(c.prompt_index, list(c.token_ids), c.text, c.finish_reason) for c in out.completions]

    return sample


def load_rollout_prompts(recipe: Recipe) -> list[PromptItem]:
    """The training prompts, checked against what the rewards need (references for verifiers)."""
    prompts = load_prompts(recipe.data.train, recipe.data)
    for i, spec in enumerate(recipe.rewards):
        if get_reward_class(spec.name).needs_answer:
            require_answers(prompts, f"the reward rewards.{i} ({spec.name!r})")
    return prompts


def rollout_steps(recipe: Recipe, n_prompts: int) -> int:
    """Optimizer steps of an RL run: train.max_steps, else train.epochs passes over the prompts."""
    ro = recipe.rollout
    assert ro is not None
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, int(n_prompts * recipe.train.epochs) // ro.prompts_per_step) * ro.num_iterations


def build_rollout_source(recipe: Recipe, *, prompts: list[PromptItem], tokenizer, objective: RLObjective,
                         ref: Any, backend: Backend, run_dir: Path | None, policy=None) -> RolloutSource:
    ro = recipe.rollout
    assert ro is not None, "build_rollout_source needs a recipe with a rollout section"
    tc = recipe.train
    precision = resolve_precision(tc.precision, backend.device)  # the runner resolves it; direct callers may not
    rewards = RewardSet.from_specs(recipe.rewards, tokenizer=tokenizer, precision=precision, device=backend.device,
                                   policy=policy, progress=False)  # the training loop's bar is on screen
    prepare = functools.partial(_prepare, objective=objective, ref=ref, num_iterations=ro.num_iterations,
                                group_size=ro.num_generations)
    return RolloutSource(
        prompts, tokenizer, ro, score=rewards, prepare=prepare,
        sampler=engine_sampler(tokenizer, precision=precision), backend=backend, batch_size=tc.batch_size,
        seed=tc.seed, steps=rollout_steps(recipe, len(prompts)),
        log_path=(run_dir / "rollouts.jsonl") if run_dir is not None else None,
        autocast=lambda: autocast_context(backend.device, precision))


def _prepare(model, batch, gather, *, objective: RLObjective, ref, num_iterations: int, group_size: int):
    return objective.prepare_rollouts(model, batch, ref=ref, gather=gather, num_iterations=num_iterations,
                                      group_size=group_size)
