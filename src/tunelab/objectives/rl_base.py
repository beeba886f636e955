"""What every on-line RL objective shares: per-token log-probs of sampled completions, the reference's, and the
base class that turns a scored generation batch into advantages.

A rollout batch (built by `tunelab.train.rollout.RolloutSource`; B completions, P prompt and C completion
columns) holds:

    prompt_ids [B, P] (left-padded), completion_ids [B, C] (right-padded; a completion runs up to and including
    the token that stopped it), input_ids / attention_mask [B, P + C] (the two concatenated),
    completion_mask [B, C] (the loss mask), rewards [B] (weighted sum; NaN = unscorable),
    rewards_per_func [B, K], is_truncated [B], temperature [] (the sampling temperature),
    and, after `RLObjective.prepare_rollouts`: advantages [B] (or [B, C]), old_per_token_logps [B, C] (when a
    generation serves several updates), ref_per_token_logps [B, C] (when the objective needs a reference);
    after the split into micro-batches: step_sequences [] and step_tokens [] (completions and loss tokens of
    the whole optimizer step, all processes).

The loop divides each step's loss sum by `step_sequences` (`unit = "example"`), so token-level aggregations
scale their sums by step_sequences / step_tokens (policy_losses.aggregate).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from tunelab.objectives.base import Objective, ObjectiveOptions
from tunelab.objectives.packed_groups import packable, packed_forward, shared_prompts
from tunelab.objectives.references import AdapterDisabledReference, Reference, default_reference, eval_mode
from tunelab.train.rollout import Gather, SingleProcess
from tunelab.train.token_logps import causal_lm_hidden, chunked_token_logps


def completion_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       pack: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What predicts each completion token: (final hidden states [B, C, d], the output projection's weight [V, d]),
    or (logits [B, C, V], None) for a model whose head cannot be applied in chunks (train/token_logps.py). Only the
    completion positions are computed through the head. When rows share their prompt (a group's completions), one
    packed forward pass computes each prompt once (packed_groups.py: the same values, the prompt's activations
    once per group instead of once per completion); otherwise (or with pack=False) the rows run as they are,
    positions counting real tokens, so left padding changes nothing."""
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_ids"]
    b, c, width = comp.size(0), comp.size(1), ids.size(1)
    inverse = shared_prompts(batch) if pack else None
    index = None
    if inverse is not None and packable(model, width + c * b):  # a bound on the packed rows' width
        kwargs, index = packed_forward(model, batch, inverse)
    else:
        positions = (att.cumsum(-1) - 1).clamp(min=0)
        # an index tensor, not an int: the kept hidden states are then a contiguous copy (a strided view makes the
        # bf16 lm_head on CPU expand its weight per row, tunelab.generate's note)
        keep = torch.arange(width - c - 1, width, device=ids.device)
        kwargs = dict(input_ids=ids, attention_mask=att, position_ids=positions, use_cache=False, logits_to_keep=keep)
    res = causal_lm_hidden(model, **kwargs)
    out, weight = res if res is not None else (model(**kwargs).logits, None)
    if index is not None:
        return out.reshape(-1, out.size(-1)).index_select(0, index.view(-1)).view(b, c, -1), weight
    return out[:, :-1, :], weight  # position t predicts completion token t


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_entropy: bool = False, pack: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the sampled completion tokens under softmax(logits / temperature): ([B, C] fp32, entropy
    [B, C] or None), from `completion_outputs`. The head is applied chunk by chunk inside the log-softmax
    (train/token_logps.py: the [B, C, V] logits and their fp32 log-softmax never exist); a model whose head is
    not a plain Linear gets the log-softmax of its full logits in fp32. Entropy is a metric: computed without
    grad."""
    comp = batch["completion_ids"]
    out, weight = completion_outputs(model, batch, pack)
    if weight is not None:
        logps, entropy = chunked_token_logps(out.reshape(-1, out.size(-1)), weight, comp.reshape(-1),
                                             temperature=temperature, with_entropy=with_entropy)
        return logps.view(comp.shape), (entropy.view(comp.shape) if entropy is not None else None)
    logits = out.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, comp.unsqueeze(-1)).squeeze(-1)  # [B, C]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


@torch.no_grad()
def reference_logps(model: torch.nn.Module, ref: Reference | None, batch: dict[str, torch.Tensor],
                    temperature: float = 1.0) -> torch.Tensor:
    """The reference's per-token completion log-probs [B, C]: the policy with its adapter disabled under a PEFT
    adapter (no second copy of the model), else `ref`'s frozen model (runner: FrozenCopyReference)."""
    reference = default_reference(model, ref)
    if isinstance(reference, AdapterDisabledReference):
        with eval_mode(reference.model), reference.model.disable_adapter():
            return completion_logps(reference.model, batch, temperature)[0]
    ref_model = getattr(reference, "model", None)
    if ref_model is None:
        raise TypeError(f"{type(reference).__name__} has no model to compute per-token log-probs with")
    return completion_logps(ref_model, batch, temperature)[0]


class RLOptions(ObjectiveOptions):
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (0: no reference is used).")


class RLObjective(Objective):
    """Base of the on-line objectives: a loss over the rollout batch, advantages computed once per generation.

    `prepare_rollouts` runs once per generation batch (no grad, eval mode: the rollout source calls it inside
    generation mode, under the training autocast): old log-probs when a generation serves several updates
    (`num_iterations` > 1; otherwise the current log-probs, detached, are the old ones and the first ratio is
    exactly 1, as in TRL), reference log-probs when `needs_reference()`, then `advantages(batch, gather)`.
    """

    Config: ClassVar[type[ObjectiveOptions]] = RLOptions
    unit: ClassVar[str] = "example"
    batch_kind: ClassVar[str] = "rollout"
    min_group_size: ClassVar[int] = 2  # completions per prompt the advantage needs (a group of 1 has no baseline)

    def reference_use(self) -> str:
        return "live" if self.needs_reference() else "none"

    def needs_reference(self) -> bool:
        return float(getattr(self.config, "beta", 0.0)) != 0.0

    def prepare_rollouts(self, model: torch.nn.Module, batch: dict[str, Any], *, ref: Reference | None = None,
                         gather: Gather | None = None, num_iterations: int = 1,
                         group_size: int) -> dict[str, Any]:
        gather = gather or SingleProcess()
        temperature = float(batch["temperature"])
        if num_iterations > 1:
            batch["old_per_token_logps"] = completion_logps(model, batch, temperature)[0].detach()
        if self.needs_reference():
            batch["ref_per_token_logps"] = reference_logps(model, ref, batch, temperature)
        self.mask_completions(batch)
        batch["advantages"] = self.advantages(batch, gather, group_size)
        return batch

    def mask_completions(self, batch: dict[str, Any]) -> None:
        """DAPO's `mask_truncated_completions`: completions cut at the length limit carry no loss."""
        if getattr(self.config, "mask_truncated_completions", False):
            keep = (~batch["is_truncated"].bool()).unsqueeze(1).to(batch["completion_mask"].dtype)
            batch["completion_mask"] = batch["completion_mask"] * keep

    def advantages(self, batch: dict[str, Any], gather: Gather, group_size: int) -> torch.Tensor:
        raise NotImplementedError
