"""On-line RL (GRPO) on 2 processes (torchrun, gloo on CPU) against 1 process, through `tunelab train`.

The design's invariant (train/rollout.py): the global generation batch of a step is the same whatever the number
of processes. Each process takes its slice of the step's prompt window (StepSampler: rank r gets
window[r * local : (r + 1) * local]) and samples its completions from the random streams of their rows in the
global batch (one seed per window, `first_sequence` = the slice's first row), so 2 processes sample exactly the
completions 1 process samples. Rewards are per completion; advantages need the whole batch (group means, and
`scale_rewards: batch` the batch std) and come through the backend's all-reduce; `dapo` divides by the step's
tokens over all processes. So the per-step reward, accuracy and lengths are equal exactly, and the loss, KL and
the trained adapter equal the 1-process run's up to summation order (fp32; 1 process accumulates 4 micro-batches
of 4 completions, 2 processes 2 each).

The recipe exercises every cross-process path: `scale_rewards: batch`, `beta > 0` (the reference pass),
`num_iterations: 2` (old log-probs cached, the generation reused on the next step), `loss_type: dapo`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dist_util import cli, export_tensors, max_abs_diff, max_rel_diff, one_process, run, torchrun
from tiny import tiny_recipe_dict

pytestmark = pytest.mark.slow

STEPS = 4
USER = Path(__file__).parents[1] / "rl" / "rl_user_rewards.py"


def _recipe(tmp_path: Path, model_dir: Path) -> str:
    d = tiny_recipe_dict(
        model_dir, tmp_path / "runs",
        objective={"name": "grpo", "beta": 0.04, "loss_type": "dapo", "scale_rewards": "batch"},
        rollout={"num_generations": 4, "prompts_per_step": 4, "max_completion_length": 6, "num_iterations": 2,
                 "log_completions_every": 1},
        rewards=[{"name": "function", "function": f"{USER}:vowels"}, {"name": "task"}],
        train={"max_steps": STEPS, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None},
        eval={"before": False, "after": False}, export={"adapter": True, "merged": False})
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_grpo_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, backend):
    recipe = _recipe(tmp_path, tiny_model_dir)
    run(one_process(*cli("train", recipe, "name=one")))
    run(torchrun(2, *cli("train", recipe, "name=two", f"distributed.backend={backend}")))
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    m1, m2 = _rows(one, "metrics.jsonl"), _rows(two, "metrics.jsonl")
    assert len(m1) == len(m2) == STEPS

    # the same completions: every process-independent rollout figure is equal exactly
    exact = ("reward", "reward_std", "rewards/function/mean", "rewards/task/mean", "accuracy",
             "completions/mean_length", "completions/max_length", "completions/min_length",
             "completions/clipped_ratio", "frac_reward_zero_std")
    gens = [r for r in m1 if "reward" in r]
    assert len(gens) == STEPS // 2  # num_iterations 2: one generation per 2 steps
    for a, b in zip(m1, m2):
        for key in exact:
            assert (key in a) == (key in b), key
            if key in a:
                assert b[key] == a[key], (a["step"], key, a[key], b[key])
    assert any(r["reward_std"] > 0 for r in gens)  # the groups carry signal: the test trains something
    # rank 0's completions (rollouts.jsonl is written by the main process) are the first half of each step's rows
    r1, r2 = _rows(one, "rollouts.jsonl"), _rows(two, "rollouts.jsonl")
    for step in {r["step"] for r in r1}:
        s1, s2 = [r for r in r1 if r["step"] == step], [r for r in r2 if r["step"] == step]
        assert len(s2) * 2 == len(s1)
        assert [(r["prompt"], r["completion"], r["reward"]) for r in s2] == \
               [(r["prompt"], r["completion"], r["reward"]) for r in s1[: len(s2)]]
        # advantages are computed over the whole batch (scale_rewards: batch): equal on rank 0's rows
        for x, y in zip(s2, s1):
            assert x["advantage"] == pytest.approx(y["advantage"], rel=1e-5, abs=1e-6)

    # the update: loss, KL and gradient norm up to summation order; the adapter after 4 steps
    for key in ("loss", "kl", "grad_norm"):
        diff = max_rel_diff([r[key] for r in m1], [r[key] for r in m2])
        print(f"\ngrpo 2 processes ({backend}) vs 1: {key} max rel diff {diff:.2e}")
        assert diff <= 1e-4, key
    assert any(r["loss"] != 0 for r in m1) and m1[-1]["kl"] > 0  # the policy moved
    diff = max_abs_diff(export_tensors(one, "adapter"), export_tensors(two, "adapter"))
    print(f"grpo 2 processes ({backend}) vs 1: adapter max abs diff {diff:.2e}")
    assert diff <= 1e-4
