"""The `iterate:` section of a recipe: self-improvement rounds (`tunelab iterate`, docs/iterate.md).

Schema only (layer 2). Each round samples completions of the training prompts with the current model, scores
them with `rewards` (the same registry and list format as on-line RL: `[{name, weight, options...}]`), keeps or
pairs them by `selection`, and trains an ordinary run on the result. Generation fields carry the rollout
section's names (`num_generations`, `max_completion_length`, `temperature`, `top_p`, `top_k`, `stop_strings`,
`generation_batch_size`). Registry-dependent checks (reward names, objective kind per strategy, a verifier for
`correct_only` and STaR) are in `tunelab.validate.validate_iterate`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.recipe.rewards import RewardSpec

Strategy = Literal["raft", "rest_em", "iterative_dpo", "spin", "self_rewarding", "star"]

#: What each strategy trains on: SFT records or preference pairs.
PAIR_STRATEGIES = ("iterative_dpo", "spin", "self_rewarding")
SFT_STRATEGIES = ("raft", "rest_em", "star")

#: Where each strategy's round starts training when `continue_from` is not given: ReST-EM and STaR fine-tune the
#: base model on every round's data (Singh et al. 2023 sec. 3; Zelikman et al. 2022 alg. 1), the others continue.
DEFAULT_CONTINUE_FROM: dict[str, str] = {"raft": "previous", "rest_em": "base", "iterative_dpo": "previous",
                                         "spin": "previous", "self_rewarding": "previous", "star": "base"}

#: The selection rule each strategy uses when `selection` is not given.
DEFAULT_SELECTION: dict[str, str] = {"raft": "best_of_k", "rest_em": "correct_only", "star": "correct_only",
                                     "iterative_dpo": "best_vs_worst", "self_rewarding": "best_vs_worst",
                                     "spin": "human_vs_generated"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IterateConfig(_Strict):
    """Self-improvement rounds: sample, score, keep or pair, train (docs/iterate.md)."""

    strategy: Strategy = Field(
        "raft", description="`raft` (best-of-k -> SFT), `rest_em` (correct samples -> SFT from the base), "
        "`iterative_dpo` (best vs worst -> DPO), `spin` (human vs generated -> SPIN), `self_rewarding` (the model "
        "judges its own samples -> DPO), `star` (correct rationales + rationalization -> SFT from the base).")
    rounds: int = Field(3, ge=1, description="Rounds of generate -> score -> build data -> train -> evaluate.")
    num_generations: int = Field(4, ge=1, description="Completions sampled per prompt each round (spin: 1).")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Prompts drawn from `data.train` each round (a fresh slice of one seeded "
        "shuffle, wrapping around); null = all of them every round.")
    max_completion_length: int = Field(64, ge=1, description="Maximum new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    stop_strings: list[str] = Field(
        default_factory=list, description="Stop a completion after the token that completes one of these strings.")
    generation_batch_size: int = Field(64, ge=1, description="Sequences the generation engine decodes together.")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Rewards scoring the samples: [{name, weight, options...}] as in RL "
        "recipes (`tunelab rewards`); the weighted sum ranks them. Not used by spin.")
    selection: Literal["best_of_k", "threshold", "top_fraction", "correct_only", "best_vs_worst",
                       "human_vs_generated"] | None = Field(
        None, description="Which samples are kept: `best_of_k` (the best of each prompt's k), `threshold` "
        "(reward >= `threshold`), `top_fraction` (the best `top_fraction` of the round), `correct_only` (the first "
        "verifier says right); pair strategies: `best_vs_worst`, `human_vs_generated` (spin). null = the "
        "strategy's own (raft: best_of_k; rest_em, star: correct_only).")
    threshold: float = Field(1.0, description="`selection: threshold`: the least reward a kept sample has.")
    top_fraction: float = Field(0.25, gt=0, le=1, description="`selection: top_fraction`: the share of the "
                                                              "round's samples kept, best first.")
    min_reward: float | None = Field(
        None, description="best_of_k: keep a prompt's best sample only if its reward is at least this (e.g. 1.0 "
        "with a verifier: skip prompts with no right answer). null = always keep it.")
    max_per_prompt: int | None = Field(
        None, ge=1, description="Keep at most this many distinct samples per prompt (ReST-EM caps each problem "
        "at 10 solutions). null = no cap.")
    rationalize: bool = Field(
        True, description="star: prompts with no correct sample are asked again with the reference answer as a "
        "hint; a correct rationale is kept, trained on the prompt without the hint (STaR's rationalization).")
    hint_template: str = Field(
        "{prompt} (Hint: the answer is {answer}.)", description="star: the rationalization prompt (the last user "
        "message with the reference answer added).")
    continue_from: Literal["previous", "base"] | None = Field(
        None, description="Where each round's training starts: the previous round's model or the base. null = the "
        "strategy's default (base for rest_em and star, previous for the others). Generation always uses the "
        "latest model; the DPO / SPIN reference is the round's starting model.")
    on_empty_round: Literal["stop", "skip"] = Field(
        "stop", description="A round that keeps no sample (or no pair): `stop` the loop there, or `skip` the round's "
        "training and go on with the same model.")
    seed: int = Field(0, description="Seed of the prompt order and of sampling (round r samples with seed + r).")

    @model_validator(mode="after")
    def _selection_fits(self) -> IterateConfig:
        sel = self.selection
        if sel is None:
            return self
        pairs = self.strategy in PAIR_STRATEGIES
        if self.strategy == "spin" and sel != "human_vs_generated":
            raise ValueError("spin pairs the human response with the model's generation: selection "
                             "human_vs_generated (or leave it unset)")
        if self.strategy != "spin" and sel == "human_vs_generated":
            raise ValueError("selection human_vs_generated is spin's; use best_vs_worst for pair strategies")
        if pairs and sel not in ("best_vs_worst", "human_vs_generated"):
            raise ValueError(f"strategy {self.strategy} builds preference pairs: selection best_vs_worst")
        if not pairs and sel in ("best_vs_worst", "human_vs_generated"):
            raise ValueError(f"strategy {self.strategy} builds SFT data: selection best_of_k, threshold, "
                             "top_fraction or correct_only")
        return self

    @property
    def start_from(self) -> str:
        """`continue_from`, or the strategy's default."""
        return self.continue_from or DEFAULT_CONTINUE_FROM[self.strategy]

    @property
    def rule(self) -> str:
        """`selection`, or the strategy's default."""
        return self.selection or DEFAULT_SELECTION[self.strategy]

    @property
    def builds_pairs(self) -> bool:
        return self.strategy in PAIR_STRATEGIES
