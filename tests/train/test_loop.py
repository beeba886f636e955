"""The training loop: normalisation under accumulation, resume equality, divergence, checkpoints."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from tiny import tiny_recipe_dict

from tunelab.data.batching import collate_sft
from tunelab.objectives.base import build_objective
from tunelab.recipe import Recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.backends import DDPBackend
from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint
from tunelab.train.loop import TrainingDiverged, forward_backward


def _examples(n=6):
    # sequences of different lengths and different numbers of target tokens, so a per-micro-batch mean
    # (the classic accumulation bug) would weight tokens differently from the global mean
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(3, 500, (length,), generator=g).tolist()
        labels = [-100] * (length - (2 + i)) + ids[length - (2 + i):]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("split", [[6], [3, 3], [1, 2, 3], [1, 1, 1, 1, 1, 1]])
def test_accumulated_gradient_equals_one_big_batch(tiny_model, split):
    examples = _examples()
    sft = build_objective("sft", {})
    backend = DDPBackend(Accelerator(cpu=True))
    # reference: token-mean CE over the whole batch, one backward
    tiny_model.zero_grad()
    big = collate_sft(examples, pad_id=2)
    logits = tiny_model(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 big["labels"][:, 1:].reshape(-1), ignore_index=-100)
    ref_loss.backward()
    ref = _grads(tiny_model)
    tiny_model.zero_grad()
    micro, start = [], 0
    for size in split:
        micro.append(collate_sft(examples[start: start + size], pad_id=2))
        start += size
    step = forward_backward(tiny_model, sft, micro, backend, "fp32")
    loss_sum, units = step.loss_sum, step.global_units
    assert units == sum(len(e["labels"]) - e["labels"].count(-100) for e in examples)
    assert loss_sum / units == pytest.approx(ref_loss.item(), rel=1e-5)
    got = _grads(tiny_model)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)


def _recipe(tiny_model_dir, tmp_path, **train):
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", train={"max_steps": 6, "save_every": 2, **train})
    return Recipe.model_validate(d)


def test_loss_falls_and_checkpoints_are_kept(tiny_model_dir, tmp_path):
    r = _recipe(tiny_model_dir, tmp_path, lr=1e-2, max_steps=12, save_every=4, keep_checkpoints=2)
    r.method = {"name": "full"}
    ws = open_workspace(r)
    _, result, params = train_workspace(ws)
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < 0.8 * sum(result.losses[:3]) / 3
    ckpts = sorted(p.name for p in (ws.run_dir / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000008", "step-000012"]
    lines = [json.loads(x) for x in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert all({"loss", "lr", "tokens_per_s", "memory_mb"} <= set(x) for x in lines)


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    # dropout on, so the RNG state matters too
    base = dict(lr=5e-3)
    r = _recipe(tiny_model_dir, tmp_path / "a", **base)
    r.method.dropout = 0.1
    ws = open_workspace(r)
    _, full, _ = train_workspace(ws)

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash()

    r2 = _recipe(tiny_model_dir, tmp_path / "b", **base)
    r2.method.dropout = 0.1
    ws2 = open_workspace(r2)
    with pytest.raises(Crash):
        train_workspace(ws2, on_step=crash_at_5)
    assert latest_checkpoint(ws2.run_dir).name == "step-000004"
    ws3 = open_workspace(r2, run_dir=ws2.run_dir, resume=True)
    _, resumed, _ = train_workspace(ws3, resume=True)
    curve = [json.loads(x)["loss"] for x in (ws2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert curve == full.losses  # bit-exact: same data, weights, optimizer, schedule and RNG
    final_a = load_checkpoint(latest_checkpoint(ws.run_dir))["trainable"]
    final_b = load_checkpoint(latest_checkpoint(ws2.run_dir))["trainable"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    r = _recipe(tiny_model_dir, tmp_path)
    ws = open_workspace(r)
    sft = ws.objective
    real_compute = sft.compute
    calls = {"n": 0}

    def poisoned(model, batch, ref=None):
        out = real_compute(model, batch, ref)
        calls["n"] += 1
        if calls["n"] > 3:  # steps 1-3 fine (checkpoint at 2), step 4 diverges
            out.loss_sum = out.loss_sum * float("nan")
        return out

    sft.compute = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*step-000002"):
        train_workspace(ws)
    ck = latest_checkpoint(ws.run_dir)
    assert ck.name == "step-000002"
    weights = load_checkpoint(ck)["trainable"]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_checkpoint_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    r = _recipe(tiny_model_dir, tmp_path, max_steps=2, save_every=None)
    ws = open_workspace(r)
    model, _, _ = train_workspace(ws)
    saved = load_checkpoint(latest_checkpoint(ws.run_dir))
    live = ws.method.trainable_state_dict(model)
    assert set(saved["trainable"]) == set(live)
    assert all(torch.equal(saved["trainable"][k], live[k]) for k in live)
    assert saved["state"]["step"] == 2 and "scheduler" in saved["state"]


def test_lr_schedule_warmup_then_cosine():
    from tunelab.train.optim import lr_factor

    assert lr_factor(0, 10, 2, "cosine") == 0.5
    assert lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_packed_training_follows_the_padded_curve(tiny_model_dir, tmp_path):
    curves = {}
    for packing in (False, True):
        r = _recipe(tiny_model_dir, tmp_path / str(packing), max_steps=3, save_every=None)
        r.method = {"name": "full"}
        r.data.packing, r.data.pack_length = packing, 128
        ws = open_workspace(r)
        _, result, _ = train_workspace(ws)
        curves[packing] = result.losses
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
