"""surgical / hft / lisa: which parameters train (counted per layer and category), what changes in a step,
optimizer state across switches, resume across a switch, loss falls."""

import json

import pytest
import torch

from test_sparse_common import (assert_resume_exact, changed, checkpoint, run, setup, snapshot, task, tiny,
                                train_config)
from tunelab.methods.freeze import layer_index
from tunelab.methods.hft import category
from tunelab.methods.registry import build_method
from tunelab.train.precision import cast_frozen_linears



def _layer_names(model, layers) -> set[str]:
    return {n for n, _ in model.named_parameters() if layer_index(n) in set(layers)}


def _outside_layers(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if layer_index(n) is None}


# -- LISA ------------------------------------------------------------------------------------------

def _lisa_seed_with_partial_overlap():
    from tunelab.methods.lisa import LISA

    for seed in range(100):
        m = LISA(LISA.Config(gamma=2, switch_every=1, seed=seed))
        a, b = set(m.draw_layers(4, 0)), set(m.draw_layers(4, 1))
        if len(a & b) == 1:
            return seed, sorted(a), sorted(b)
    raise AssertionError("no seed found")


def test_lisa_trains_current_layers_and_resets_state_of_new_ones():
    seed, first, second = _lisa_seed_with_partial_overlap()
    method = build_method("lisa", {"gamma": 2, "switch_every": 2, "seed": seed})
    tc = train_config()
    model, opt = setup(method, tiny(4), tc)
    # until on_train_start every layer is trainable, so the runner's bf16 storage of frozen linears
    # (cast_frozen_linears, right after prepare) cannot touch a layer that LISA trains later
    assert all(p.requires_grad for p in model.parameters())
    assert cast_frozen_linears(model, torch.bfloat16) == 0
    method.on_train_start(model, 3)
    always = _outside_layers(model)  # embeddings (tied head) and the final norm
    assert always == {"model.embed_tokens.weight", "model.norm.weight"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == always | _layer_names(model, first)
    assert method.state_dict() == {"period": 0, "layers": first}

    before = snapshot(model)
    run(method, model, opt, range(0, 2), tc)  # steps 1-2 train `first`; the switch after step 2 draws `second`
    assert changed(before, model) == always | _layer_names(model, first)
    assert method.layers == second and json.loads(json.dumps(method.state_dict())) == {"period": 1, "layers": second}
    params = dict(model.named_parameters())
    assert all(params[n] not in opt.state for n in _layer_names(model, set(first) - set(second)))  # state freed
    before = snapshot(model)
    run(method, model, opt, range(2, 3), tc)
    assert changed(before, model) == always | _layer_names(model, second)
    kept, new = (set(first) & set(second)), (set(second) - set(first))
    assert all(int(opt.state[params[n]]["step"]) == 3 for n in _layer_names(model, kept) | always)
    assert all(int(opt.state[params[n]]["step"]) == 1 for n in _layer_names(model, new))  # fresh moments


def test_lisa_resume_across_switches_is_exact_and_loss_falls():
    losses = assert_resume_exact("lisa", {"gamma": 1, "switch_every": 2, "seed": 3}, train_config(), steps=8,
                                 split=3, layers=4)
    assert losses[-1] < 0.8 * losses[0]


def test_lisa_rejects_gamma_above_layers():
    with pytest.raises(ValueError, match="exceeds"):
        build_method("lisa", {"gamma": 3}).prepare(tiny(2))


# -- HFT -------------------------------------------------------------------------------------------

def test_hft_freezes_half_of_each_category():
    model = tiny(2)
    method = build_method("hft", {"seed": 1})
    method.prepare(model)
    cats: dict[tuple, list[bool]] = {}
    for n, p in model.named_parameters():
        cats.setdefault(category(n), []).append(p.requires_grad)
    assert sorted(cats) == sorted([("attn", 0), ("attn", 1), ("mlp", 0), ("mlp", 1), ("norm", 0), ("norm", 1),
                                   ("model",)], key=str)
    for key, flags in cats.items():
        n = len(flags)
        assert sum(flags) in ({n // 2} if n % 2 == 0 else {n // 2, n // 2 + 1}), key  # q,k,v,o: exactly 2 of 4
    # the 3 MLP matrices: floor or ceil of half by a fair coin, so half in expectation over draws
    counts = [sum(1 for n in method.draw(model, p) if category(n) == ("mlp", 0)) for p in range(400)]
    assert set(counts) == {1, 2} and abs(sum(counts) / 400 - 1.5) < 0.1

    tc = train_config()
    model, opt = tiny(2), None
    method = build_method("hft", {"seed": 1})
    model, opt = setup(method, model, tc)
    before = snapshot(model)
    run(method, model, opt, range(1), tc)
    assert changed(before, model) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_hft_redraws_every_switch_and_resumes_exactly():
    method = build_method("hft", {"switch_every": 2, "seed": 0})
    model = tiny(2)
    method.prepare(model)
    draws = [method.draw(model, p) for p in range(3)]
    assert draws[0] != draws[1] != draws[2]
    assert method.draw(model, 1) == draws[1]  # a pure function of (seed, period)
    losses = assert_resume_exact("hft", {"switch_every": 2, "seed": 0}, train_config(), steps=6, split=3)
    assert losses[-1] < 0.8 * losses[0]


# -- surgical --------------------------------------------------------------------------------------

def _reference_fisher(model, batches):
    """Independent: per layer, sum over batches of sum of squared grads / (batches * entries)."""
    layers = sorted({layer_index(n) for n, _ in model.named_parameters()} - {None})
    out = {}
    for i in layers:
        params = [p for n, p in model.named_parameters() if layer_index(n) == i]
        total = 0.0
        for b in batches:
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            grads = torch.autograd.grad(loss, params)
            total += sum(float(g.double().pow(2).sum()) for g in grads)
        out[i] = total / (len(batches) * sum(p.numel() for p in params))
    return out


def test_surgical_ranks_layers_by_fisher_and_trains_top_k():
    model = tiny(4)
    with torch.no_grad():  # make layer 2 clearly the most sensitive: its MLP output is scaled up
        model.model.layers[2].mlp.down_proj.weight.mul_(8.0)
    batches = [task(seed=s) for s in range(3)]
    method = build_method("surgical", {"top_k": 2, "calibration_batches": 3})
    scores = method.calibrate(model, batches)
    ref = _reference_fisher(model, batches)
    assert scores == pytest.approx(ref, rel=1e-6)
    assert method.layers == sorted(sorted(ref, key=lambda i: -ref[i])[:2]) and 2 in method.layers
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradients behind

    tc = train_config()
    model, opt = setup(method, model, tc)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _layer_names(model, method.layers)
    before = snapshot(model)
    losses = run(method, model, opt, range(10), tc)
    assert changed(before, model) == _layer_names(model, method.layers)
    assert losses[-1] < 0.85 * losses[0]


def test_surgical_selection_survives_checkpoints_without_recalibration():
    batches = [task(seed=s) for s in range(2)]
    calibrate = lambda method, model: method.calibrate(model, batches)  # noqa: E731
    assert_resume_exact("surgical", {"top_k": 1}, train_config(), steps=4, split=2, prepare_hook=calibrate)
    # `tunelab eval` restores a run without calibrating: the selection comes from the method state
    src = build_method("surgical", {"top_k": 1})
    src.calibrate(tiny(2), batches)
    tc = train_config()
    model, opt = setup(src, tiny(2), tc)
    ck = checkpoint(src, model, opt)
    fresh = build_method("surgical", {"top_k": 1})
    model2 = fresh.prepare(tiny(2))
    assert not any(p.requires_grad for p in model2.parameters())
    with pytest.raises(RuntimeError, match="calibrate"):
        fresh.param_groups(model2, 0.0)
    fresh.load_state_dict(json.loads(ck["method"]))
    assert fresh.layers == src.layers
    assert {n for n, p in model2.named_parameters() if p.requires_grad} == _layer_names(model2, src.layers)


def test_surgical_calibrate_from_examples_uses_the_objective():
    from tunelab.data.batching import collate_sft
    from tunelab.objectives.base import build_objective

    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 100, (8 + i,), generator=g).tolist()} for i in range(7)]
    for e in examples:
        e["labels"] = [-100] * 4 + e["input_ids"][4:]
    sft = build_objective("sft", {})
    model = tiny(2)
    method = build_method("surgical", {"top_k": 1, "calibration_batches": 2})
    got = method.calibrate_from_examples(model, examples, sft, pad_id=2, batch_size=3)  # first 2 batches of 3
    batches = [collate_sft(examples[:3], 2), collate_sft(examples[3:6], 2)]
    assert got == method.calibrate(model, batches, objective=sft)
    # the objective's loss_sum / n_units is the token-mean loss HF computes from labels
    assert got == pytest.approx(method.calibrate(model, batches), rel=1e-5)
