"""Training-time behaviour of the PEFT-backed methods: LoRA+'s learning rates, AdaLoRA's hooks (regulariser,
budget, resume), soft-prompt logits aligned with labels, OFT's rotation, and the whole runner path."""

from __future__ import annotations

import pytest
import torch
from test_peft_methods import fixed_batch, load_tiny, pattern_batch, prepared, sft_loss, train_steps  # noqa: F401

from tunelab.methods.registry import build_method
from tunelab.recipe import TrainConfig


def test_loraplus_gives_b_lr_ratio_times_the_lr_through_the_schedule(tiny_model_dir):
    from tunelab.train.optim import build_scheduler

    method, model, _ = prepared("loraplus", tiny_model_dir, {"r": 4, "alpha": 8, "lr_ratio": 16})
    tc = TrainConfig(lr=1e-3, warmup_ratio=0.5)
    opt = method.build_optimizer(model, tc)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(by_lr) == {1e-3, 16e-3}
    assert by_lr[1e-3] and all(".lora_A." in n for n in by_lr[1e-3])
    assert by_lr[16e-3] and all(".lora_B." in n for n in by_lr[16e-3])
    assert len(by_lr[1e-3]) == len(by_lr[16e-3]) == 14
    sched = build_scheduler(opt, tc, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
        a, b = (g["lr"] for g in opt.param_groups)
        assert b == pytest.approx(16 * a) and a < 1e-3  # warmup/decay scale both


ADA = {"init_r": 4, "target_r": 2, "delta_t": 1, "tinit_ratio": 0.0, "tfinal_ratio": 0.0, "total_step": 6}


def test_adalora_after_backward_adds_pefts_orthogonal_regulariser(tiny_model_dir):
    """Our loss (no labels: PEFT adds nothing) + after_backward == PEFT's forward with labels (loss + w * R)."""
    opts = ADA | {"total_step": 100, "tinit_ratio": 0.1}  # step 1 is in the warm-up: no masking yet
    method, model, _ = prepared("adalora", tiny_model_dir, opts)
    with torch.no_grad():  # E starts at 0: give the triplets weight so every factor has a task gradient
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.1)
    batch = fixed_batch()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()  # PEFT: mean-token CE + 0.5 * mean ||P^T P - I||, ||Q Q^T - I||
    reference = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    sft_loss(model, batch).backward()
    without = {n: p.grad.clone() for n, p in params.items()}
    method.after_backward(model, 1)
    assert any((without[n] - reference[n]).abs().max() > 1e-4 for n in params if ".lora_A." in n)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-5)


def test_adalora_prunes_to_the_target_budget_and_saves_the_pruned_ranks(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    method, model, _ = prepared("adalora", tiny_model_dir, ADA)
    train_steps(method, model, pattern_batch(), 6, 3e-2)
    pattern = model.peft_config["default"].rank_pattern
    assert len(pattern) == 14 and sum(sum(keep) for keep in pattern.values()) == 2 * 14  # target_r per matrix
    params = dict(model.named_parameters())
    for key, keep in pattern.items():
        E = params[f"base_model.model.{key}"].detach().view(-1)  # [init_r]
        assert torch.equal(E[~torch.tensor(keep)], torch.zeros(4 - sum(keep)))  # pruned: exactly 0 after step
    method.save_adapter(model, str(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in saved.items() if "lora_E" in k) == 28  # only the kept triplets


def test_adalora_refuses_a_loop_without_after_backward(tiny_model_dir):
    method, model, _ = prepared("adalora", tiny_model_dir, ADA)
    sft_loss(model, fixed_batch()).backward()
    with pytest.raises(RuntimeError, match="after_backward"):
        method.on_step_end(model, 1, None)


def test_adalora_takes_total_steps_from_the_runner():
    method = build_method("adalora", {})
    method.total_steps = 40
    cfg = method.peft_config()
    assert (cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT) == (40, 4, 8, 10)
    method = build_method("adalora", {"tinit_ratio": 0.6, "tfinal_ratio": 0.5})
    method.total_steps = 10
    with pytest.raises(ValueError, match="no budget phase"):
        method.peft_config()


def test_adalora_resume_equals_uninterrupted(tiny_model_dir):
    """Checkpoint = trainable tensors + importance EMAs + rank pattern + optimizer: 3 + 3 steps == 6 steps."""
    batch = pattern_batch()
    method, model, _ = prepared("adalora", tiny_model_dir, ADA)
    train_steps(method, model, batch, 6, 3e-2)
    straight = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def run(method, model, steps, start, opt_state=None):
        from tunelab.train.optim import build_optimizer

        tc = TrainConfig(lr=3e-2, max_grad_norm=None)
        opt = build_optimizer(method.param_groups(model, 0.0), tc)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for step in range(start + 1, start + steps + 1):
            sft_loss(model, batch).backward()
            method.after_backward(model, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.on_step_end(model, step, opt)
        return opt

    method, model, _ = prepared("adalora", tiny_model_dir, ADA)
    opt = run(method, model, 3, 0)
    saved = (method.trainable_state_dict(model), method.state_dict(), opt.state_dict())
    assert any(k.startswith("adalora_state::") for k in saved[0])
    method, model, _ = prepared("adalora", tiny_model_dir, ADA)
    method.load_trainable_state_dict(model, saved[0])
    method.load_state_dict(saved[1])
    run(method, model, 3, 3, saved[2])
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, straight[n]), n


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_soft_prompt_logits_are_aligned_with_the_labels(name, tiny_model_dir):
    """The hook drops the n virtual positions: our objective's loss == PEFT's own (labels padded with -100).
    (PEFT's would also score the first token from the last virtual one; SFT data never targets position 0.)"""
    _, model, _ = prepared(name, tiny_model_dir, {"num_virtual_tokens": 3})
    batch = fixed_batch()
    batch["labels"][:, :3] = -100  # a prompt, as the SFT encoder masks it
    with torch.no_grad():
        ours = sft_loss(model, batch)
        out = model(**batch)
    assert out.logits.shape == (2, 12, model.config.vocab_size)
    torch.testing.assert_close(ours, out.loss, atol=1e-5, rtol=0)  # a different summation order


def test_oft_keeps_the_row_norms_of_w(tiny_model_dir, tiny_tokenizer, tmp_path):
    """W' = W0 R with R orthogonal (exact Cayley, the default): every neuron keeps its norm (hyperspherical
    energy). PEFT's Cayley-Neumann series (5 terms) loses it at this lr: rows drift by ~20%."""
    from transformers import AutoModelForCausalLM

    from tunelab.export import export_merged

    method, model, reference = prepared("oft", tiny_model_dir, {"block_size": 16})
    train_steps(method, model, pattern_batch(), 6, 3e-2)
    export_merged(method, model, tiny_tokenizer, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        W0 = reference.get_submodule(f"model.layers.0.{name}").weight.detach()
        W = merged.get_submodule(f"model.layers.0.{name}").weight.detach()
        assert (W - W0).abs().max() > 1e-3  # it did rotate
        torch.testing.assert_close(W.norm(dim=1), W0.norm(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["prompt_tuning", "pissa"])
def test_run_recipe_trains_evaluates_and_exports(name, tiny_model_dir, tmp_path):
    """The main path end to end: SFT objective, exact-match generation, both exports (or the refusal)."""
    from peft import PeftModel
    from tiny import tiny_recipe_dict

    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    options = {"num_virtual_tokens": 4} if name == "prompt_tuning" else {"r": 4, "alpha": 4}
    recipe = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, method={"name": name, **options},
                                                    train={"lr": 3e-2}))
    summary = run_recipe(recipe)
    assert summary["exports"]["adapter"].endswith("adapter")
    if name == "prompt_tuning":
        assert summary["exports"]["merged"].startswith("skipped:") and "virtual tokens" in summary["exports"]["merged"]
    else:
        assert summary["exports"]["merged"].endswith("merged")
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    loaded = PeftModel.from_pretrained(load_tiny(tiny_model_dir), summary["exports"]["adapter"])
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n or "prompt_encoder" in n) > 0
