"""Shared helpers of the method-zoo tests (selective, sparse, memory-efficient, quantised methods), and
the registry check for all of them.

`run` mirrors the training loop's order of calls on the Method interface (prepare, build_optimizer /
param_groups, on_train_start, custom_step or forward_backward + clip + step + zero_grad, on_step_end) and `checkpoint`
round-trips what the loop's checkpoints carry through the same serialisers (safetensors, torch.load with
weights_only=True, JSON), so resume tests exercise exactly what a real resume does, in milliseconds.
"""

from __future__ import annotations

import io
import json
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tiny import build_tiny_model

from tunelab.methods.registry import build_method, list_methods
from tunelab.objectives.base import build_objective
from tunelab.recipe import TrainConfig
from tunelab.train.backends import DDPBackend
from tunelab.train.loop import forward_backward
from tunelab.train.optim import build_optimizer

VOCAB = 128
ZOO = {
    "surgical": "2210.11466", "hft": "2404.18466", "lisa": "2403.17919", "galore": "2403.03507",
    "mezo": "2305.17333", "lift": "2506.00772", "spiel": "2401.16405", "gmt": "2406.15330", "smt": "2405.15525",
    "qlora": "2305.14314",
}


def tiny(layers: int = 2, seed: int = 0, **kw):
    return build_tiny_model(VOCAB, seed=seed, num_hidden_layers=layers, **kw)


def task(n: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A memorisation task: n fixed random sequences, loss on every token after the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "precision": "fp32", "max_grad_norm": 1.0, "weight_decay": 0.0, **kw})


_BACKEND = None


def backend() -> DDPBackend:
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = DDPBackend(Accelerator(cpu=True))
    return _BACKEND


def setup(method, model, tc: TrainConfig):
    model = method.prepare(model)
    opt = method.build_optimizer(model, tc) or build_optimizer(method.param_groups(model, tc.weight_decay), tc)
    return model, opt


def run(method, model, opt, steps: range, tc: TrainConfig, batch=None) -> list[float]:
    """Train `steps` (0-based step indices) on `batch` exactly as the loop does; returns the losses."""
    sft = build_objective("sft", {})
    batch = batch if batch is not None else task()
    clip = [p for g in opt.param_groups for p in g["params"]]
    method.on_train_start(model, steps.stop)  # the loop calls it before the first step (after a resume's load)
    losses = []
    for step in steps:
        micro = [batch]
        if method.capabilities.custom_step:
            result = method.custom_step(model=model, batches=micro, objective=sft, optimizer=opt, lr=tc.lr,
                                        step=step, ref=None, backend=backend())
        else:
            result = forward_backward(model, sft, micro, backend(), tc.precision)
            if tc.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(clip, tc.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        method.on_step_end(model, step + 1, opt)
        losses.append(result.loss_sum / result.global_units)
    return losses


def checkpoint(method, model, opt) -> dict:
    """What the loop's checkpoint stores, through the same serialisers."""
    trainable = {k: v.detach().contiguous().clone() for k, v in method.trainable_state_dict(model).items()}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return {"trainable": st_save(trainable), "optimizer": buf.getvalue(),
            "method": json.dumps(method.state_dict())}  # must be JSON: no default=str fallback here


def restore(method, model, opt, ck: dict) -> None:
    """The loop's resume order: trainable tensors, optimizer, then method state."""
    method.load_trainable_state_dict(model, st_load(ck["trainable"]))
    opt.load_state_dict(torch.load(io.BytesIO(ck["optimizer"]), weights_only=True))
    method.load_state_dict(json.loads(ck["method"]))


def assert_resume_exact(name: str, options: dict, tc: TrainConfig, steps: int = 4, split: int = 2,
                        layers: int = 2, prepare_hook=None) -> list[float]:
    """Uninterrupted run == run to `split`, checkpoint, fresh model+method, restore, continue (bit-exact)."""
    def fresh():
        method, model = build_method(name, options), tiny(layers)
        if prepare_hook is not None:
            prepare_hook(method, model)
        return method, *setup(method, model, tc)

    m1, model1, opt1 = fresh()
    full = run(m1, model1, opt1, range(steps), tc)
    m2, model2, opt2 = fresh()
    first = run(m2, model2, opt2, range(split), tc)
    ck = checkpoint(m2, model2, opt2)
    m3, model3, opt3 = fresh()
    restore(m3, model3, opt3, ck)
    rest = run(m3, model3, opt3, range(split, steps), tc)
    assert first + rest == full
    final1, final3 = m1.trainable_state_dict(model1), m3.trainable_state_dict(model3)
    assert set(final1) == set(final3)
    assert all(torch.equal(final1[k], final3[k]) for k in final1)
    return full


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n in before if not torch.equal(before[n], now[n].detach())}


def test_zoo_is_registered_with_papers():
    methods = list_methods()
    for name, arxiv in ZOO.items():
        assert name in methods, name
        assert methods[name].paper == f"https://arxiv.org/abs/{arxiv}"
        doc = sys.modules[methods[name].__module__].__doc__
        assert "Update rule" in doc and arxiv in doc and "Defaults" in doc, name  # the docstring standard


def test_every_zoo_config_rejects_unknown_keys():
    import pydantic
    import pytest

    for name in ZOO:
        with pytest.raises(pydantic.ValidationError):
            build_method(name, {"no_such_option": 1})
