"""TRL 1.16's own GRPO / RLOO code run on given tensors: the trainers' methods called on a stand-in `self`
that has only what those methods read, so the parity tests compare with TRL's source, not a re-implementation.

`trl_grpo_loss` runs `GRPOTrainer._compute_loss` with the per-token log-probs returned by a stub of
`_get_per_token_logps_and_entropies`; `trl_grpo_generation` runs `GRPOTrainer._generate_and_score_completions`
with stubbed generation, rewards and log-prob passes, which gives TRL's advantages, masks and token counts.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl.trainer.grpo_trainer import GRPOTrainer


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def gather_for_metrics(self, t):
        return t


def _args(**kw):
    base = dict(use_bias_correction_kl=False, delta=None, steps_per_generation=1, gradient_accumulation_steps=1,
                gradient_checkpointing_kwargs=None, per_device_train_batch_size=None, per_device_eval_batch_size=None)
    base.update(kw)
    return SimpleNamespace(**base)


def trl_grpo_loss(logps: torch.Tensor, inputs: dict, *, loss_type="dapo", epsilon=0.2, epsilon_high=None, beta=0.0,
                  importance_sampling_level="token", max_completion_length=None, grad_accum=1, delta=None):
    """TRL's loss for one micro-batch whose policy log-probs are `logps` [B, C] (a tensor that may require grad)."""
    entropies = torch.zeros_like(logps)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
        args=_args(delta=delta, steps_per_generation=grad_accum), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, accelerator=_Accelerator(),
        max_completion_length=max_completion_length or logps.size(1), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


def trl_grpo_generation(prompt_ids: list[list[int]], completion_ids: list[list[int]], rewards_per_func: torch.Tensor,
                        *, num_generations: int, reward_weights=None, scale_rewards="group", beta=0.0,
                        mask_truncated_completions=False, eos_id=2, pad_id=0, old_logps=None, ref_logps=None,
                        num_iterations=1, trainer=GRPOTrainer, normalize_advantages=False):
    """TRL's generation-batch dict (advantages, masks, num_items_in_batch, ...) for fixed completions and rewards."""
    k = rewards_per_func.size(1)
    calls = []

    def per_token(model, *a, **kw):
        calls.append(model)
        return (ref_logps if model == "ref" else old_logps), None, None

    fake = SimpleNamespace(
        accelerator=_Accelerator(), model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, tools=None,
        environments=None, _generate=lambda prompts: (prompt_ids, completion_ids, None, ["c"] * len(completion_ids),
                                                       None, {}, None, []),
        _tokenizer=SimpleNamespace(pad_token_id=pad_id), pad_to_multiple_of=None,
        mask_truncated_completions=mask_truncated_completions, eos_token_ids=[eos_id],
        args=_args(steps_per_generation=1, gradient_accumulation_steps=1 if num_iterations == 1 else 2,
                   per_device_train_batch_size=len(completion_ids)),
        num_iterations=num_iterations, use_vllm=False, vllm_importance_sampling_correction=False,
        _get_per_token_logps_and_entropies=per_token, beta=beta, ref_model="ref" if beta else None,
        _calculate_rewards=lambda *a: rewards_per_func, num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.tensor(reward_weights if reward_weights is not None else [1.0] * k),
        scale_rewards=scale_rewards, reward_func_names=[f"r{i}" for i in range(k)],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False, processing_class=None,
        normalize_advantages=normalize_advantages, reward_clip_range=None, temperature=1.0,
        state=SimpleNamespace(num_input_tokens_seen=0, global_step=0))
    if trainer.__name__ == "RLOOTrainer":  # its _generate returns three things
        fake._generate = lambda prompts: (prompt_ids, completion_ids, ["c"] * len(completion_ids))
    inputs = [{"prompt": "p"} for _ in completion_ids]
    out = trainer._generate_and_score_completions(fake, inputs)
    return out, fake._metrics["train"]
