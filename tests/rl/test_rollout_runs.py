"""On-line RL through the runner on the tiny model: metrics and rollouts logged, exact resume with a buffered
generation, the LoRA reference is the adapter-disabled base, bad input refused or counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.data.formats import DataError
from tunelab.objectives.references import FrozenCopyReference
from tunelab.objectives.rl_base import completion_logps, reference_logps
from tunelab.recipe import Recipe, RecipeError
from tunelab.runner import open_workspace, prepare_workspace, run_recipe, train_workspace
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.validate import validate_recipe

USER = Path(__file__).with_name("rl_user_rewards.py")


def rl_recipe(model_dir, out, *, objective=None, rollout=None, rewards=None, **sections):
    from tiny import tiny_recipe_dict

    d = tiny_recipe_dict(model_dir, out, objective=objective or {"name": "grpo", "beta": 0.04},
             rollout={"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 6,
                      "log_completions_every": 1, **(rollout or {})},
             rewards=rewards or [{"name": "function", "function": f"{USER}:vowels"}, {"name": "task"}],
             export={"merged": False, "adapter": False}, **sections)
    return validate_recipe(Recipe.model_validate(d))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_and_logs_rollout_metrics(tiny_model_dir, tmp_path):
    recipe = rl_recipe(tiny_model_dir, tmp_path, eval={"before": False, "after": False})
    summary = run_recipe(recipe)
    run_dir = Path(summary["run_dir"])
    rows = metrics(run_dir)
    assert len(rows) == 4
    for key in ("reward", "reward_std", "rewards/function/mean", "rewards/function/std", "rewards/task/mean",
                "accuracy", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length",
                "completions/clipped_ratio", "rollout_time_s", "update_time_s", "frac_reward_zero_std"):
        assert key in rows[0], key
    assert any(r["loss"] != 0.0 for r in rows) and all(r["grad_norm"] > 0 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # the policy moved off the base
    logged = [json.loads(x) for x in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 4 * 2 * 4 and {"prompt", "completion", "reward", "rewards", "advantage"} <= set(logged[0])
    assert logged[0]["answer"] is not None


def test_resume_is_exact_with_a_buffered_generation(tiny_model_dir, tmp_path):
    """num_iterations = 2: the checkpoint after step 3 carries generation 2's batch (its step 4 reuses it)."""

    class Crash(Exception):
        pass

    def run(sub, *, crash_at=None, resume=False, run_dir=None):
        recipe = rl_recipe(tiny_model_dir, tmp_path / sub, rollout={"num_iterations": 2},
                           train={"max_steps": 5, "save_every": 1}, eval={"before": False, "after": False})
        ws = open_workspace(recipe, run_dir=run_dir, resume=resume)

        def on_step(step, loss):
            if step == crash_at:
                raise Crash()

        train_workspace(ws, resume=resume, on_step=on_step)
        return ws.run_dir

    full = metrics(run("a"))
    with pytest.raises(Crash):
        run("b", crash_at=4)
    run_dir = tmp_path / "b" / "tiny"
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == 3 and state["source"]["buffer"] is not None  # mid-generation: the batch is saved
    run("b", resume=True, run_dir=run_dir)
    resumed = metrics(run_dir)
    for key in ("loss", "grad_norm", "kl"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    assert [r.get("reward") for r in resumed] == [r.get("reward") for r in full]


def test_lora_reference_is_the_adapter_disabled_base_not_a_copy(tiny_model_dir, tmp_path):
    recipe = rl_recipe(tiny_model_dir, tmp_path)
    already = live_models()
    ws = open_workspace(recipe)
    model = prepare_workspace(ws)
    assert ws.ref is None  # no FrozenCopyReference: the objectives use the policy with its adapter switched off
    for name, p in model.named_parameters():  # move the adapter off zero so policy and base differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_ids": ids[:, 3:]}
    ref = reference_logps(model, None, batch)
    with torch.no_grad():
        policy = completion_logps(model, batch)[0]
        with model.disable_adapter():
            off = completion_logps(model, batch)[0]
    assert torch.equal(ref, off) and not torch.allclose(ref, policy)
    assert live_models() - already == 1  # the policy only: no second model anywhere in memory


def live_models() -> int:
    """Causal LMs alive in this process (a run's policy, plus a frozen reference copy if one was made)."""
    import gc

    from transformers import PreTrainedModel

    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, PreTrainedModel) and type(o).__name__.endswith("ForCausalLM"))


def test_full_fine_tuning_with_a_kl_gets_a_frozen_copy(tiny_model_dir, tmp_path):
    recipe = rl_recipe(tiny_model_dir, tmp_path, method={"name": "full"})
    already = live_models()
    ws = open_workspace(recipe)
    prepare_workspace(ws)
    assert isinstance(ws.ref, FrozenCopyReference)
    assert live_models() - already == 2  # the policy and its frozen copy: what the LoRA test checks is absent there


def test_a_raising_reward_scores_zero_and_is_counted(tiny_model_dir, tmp_path, caplog):
    recipe = rl_recipe(tiny_model_dir, tmp_path, rewards=[
        {"name": "function", "function": f"{USER}:explodes_on_e"}, {"name": "function", "function": f"{USER}:vowels"}],
        train={"max_steps": 2}, eval={"before": False, "after": False})
    summary = run_recipe(recipe)
    rows = metrics(Path(summary["run_dir"]))
    assert "reward 'function' failed on" in caplog.text
    errors = rows[-1].get("reward_errors/function", 0)
    assert errors > 0 and rows[-1]["rewards/function/mean"] <= 1.0


def test_group_of_one_is_refused_for_group_objectives_but_fine_for_reinforce_pp(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="rollout.num_generations.*at least 2"):
        rl_recipe(tiny_model_dir, tmp_path, rollout={"num_generations": 1}, train={"batch_size": 2})
    rl_recipe(tiny_model_dir, tmp_path, objective={"name": "reinforce_pp"}, rollout={"num_generations": 1},
              train={"batch_size": 2})


def test_unknown_reward_and_rewards_without_rollout_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="rewards.1.name.*unknown reward 'nope'"):
        rl_recipe(tiny_model_dir, tmp_path, rewards=[{"name": "task"}, {"name": "nope"}])
    with pytest.raises(RecipeError, match="objective 'grpo' learns from samples"):
        from tiny import tiny_recipe_dict

        validate_recipe(Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, objective={"name": "grpo"})))
    with pytest.raises(RecipeError, match="regular expression"):
        rl_recipe(tiny_model_dir, tmp_path, rewards=[{"name": "regex", "pattern": "("}])


def test_prompts_without_answers_are_refused_before_any_run_dir(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n{"question": "What is 3 + 3?"}\n')
    recipe = rl_recipe(tiny_model_dir, tmp_path / "runs", rewards=[{"name": "math"}],
                       data={"train": {"path": str(data)}, "eval": None})
    with pytest.raises(DataError, match=r"prompts.jsonl:2: no reference answer.*rewards.0 \('math'\)"):
        open_workspace(recipe)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("objective,extra", [
    ({"name": "gspo"}, {}), ({"name": "rloo", "beta": 0.05, "normalize_advantages": True}, {}),
    ({"name": "reinforce_pp", "beta": 0.01, "baseline": "group"}, {}),
    ({"name": "online_dpo", "beta": 0.1}, {}),
    ({"name": "grpo", "loss_type": "dr_grpo", "scale_rewards": "batch"},
     {"num_iterations": 2, "dynamic_sampling": True, "max_resample": 1})])
def test_every_rl_objective_trains_the_policy(tiny_model_dir, tmp_path, objective, extra):
    recipe = rl_recipe(tiny_model_dir, tmp_path, objective=objective, rollout=extra, train={"max_steps": 2},
                       eval={"before": False, "after": False})
    ws = open_workspace(recipe)
    model = prepare_workspace(ws)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, result, _ = train_workspace(ws)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    moved = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    if objective["name"] == "grpo" and extra.get("dynamic_sampling"):
        assert "dynamic_sampling/rounds" in metrics(ws.run_dir)[0]
    assert moved or objective["name"] == "online_dpo"  # online DPO moves only when some group has a pair
