"""surgical (Auto-RGN, block choice) / hft / lisa: which parameters train (counted per layer and category), what
changes in a step, optimizer state across switches, resume across a switch, loss falls."""

import json

import pytest
import torch
from test_sparse_common import assert_resume_exact, changed, run, setup, snapshot, task, tiny, train_config

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


def test_hft_trains_exactly_half_of_the_mlp_matrices():
    """HFT's per-layer rule (attention 2 of 4; the MLP's 3 matrices: 2 in half of the layers, 1 in the other
    half) trains exactly half of each kind, for every draw. The old fair coin per layer did so only on average."""
    model = tiny(4)
    method = build_method("hft", {"seed": 0})
    method.prepare(model)
    for period in range(30):
        drawn = method.draw(model, period)
        per_layer = [sum(1 for n in drawn if category(n) == ("mlp", i)) for i in range(4)]
        assert sorted(per_layer) == [1, 1, 2, 2], (period, per_layer)
        assert all(sum(1 for n in drawn if category(n) == ("attn", i)) == 2 for i in range(4))
    three = tiny(3)  # an odd number of layers: 4 or 5 of the 9 MLP matrices
    totals = {sum(1 for n in method.draw(three, p) if category(n)[0] == "mlp") for p in range(40)}
    assert totals == {4, 5}


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

def test_surgical_auto_rgn_is_the_reference_per_tensor_learning_rate():
    """Auto-RGN as the authors' main.py builds it: one Adam group per tensor with lr = weight * lr, weight =
    (||g|| / ||W||) / max over tensors; recomputed here at every step from that step's (clipped) gradient.
    Checked against a plain torch AdamW given those per-group lrs by hand, over two steps (moments kept)."""
    import copy

    from tunelab.methods.surgical import rgn_weights

    tc = train_config(lr=1e-2, weight_decay=0.1)
    model = tiny(2)
    ref = copy.deepcopy(model)
    method = build_method("surgical", {})
    model, opt = setup(method, model, tc)
    assert all(p.requires_grad for p in model.parameters())  # the whole model takes part
    names = [n for n, _ in ref.named_parameters()]
    params = dict(ref.named_parameters())
    groups = [{"params": [params[n]], "lr": tc.lr, "weight_decay": 0.1 if params[n].ndim >= 2 else 0.0}
              for n in names]
    ref_opt = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=1e-8, foreach=False)
    batch = task()
    for step in range(2):
        run(method, model, opt, range(step, step + 1), tc, batch=batch)
        # the reference: same gradient (forward_backward + clipping), RGN by hand, per-group lrs
        from test_sparse_common import backend

        from tunelab.objectives.base import build_objective
        from tunelab.train.loop import forward_backward

        forward_backward(ref, build_objective("sft", {}), [batch], backend(), "fp32")
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), tc.max_grad_norm)
        rgn = [float(params[n].grad.norm() / params[n].detach().norm()) for n in names]
        w = [r / max(rgn) for r in rgn]
        assert w == pytest.approx(rgn_weights(rgn))
        for g, wi in zip(ref_opt.param_groups, w):
            g["lr"] = tc.lr * wi
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert method.weights == pytest.approx(dict(zip(names, w)), rel=1e-5)
        now = dict(model.named_parameters())
        for n in names:
            torch.testing.assert_close(now[n].detach(), params[n].detach(), rtol=1e-5, atol=1e-7, msg=n)
        assert all(g["lr"] == tc.lr for g in opt.param_groups)  # the scheduled lr is restored after the step
    assert len(set(round(x, 6) for x in w)) > 5 and max(w) == 1.0  # a soft, per-tensor weighting


def test_surgical_block_choice_trains_only_the_block():
    method = build_method("surgical", {"layers": [0], "auto_rgn": False})
    tc = train_config()
    model, opt = setup(method, tiny(3), tc)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _layer_names(model, [0])
    before = snapshot(model)
    losses = run(method, model, opt, range(10), tc)
    assert changed(before, model) == _layer_names(model, [0])
    assert losses[-1] < 0.9 * losses[0]
    with pytest.raises(ValueError, match="out of range"):
        build_method("surgical", {"layers": [5]}).prepare(tiny(3))


def test_surgical_auto_rgn_resume_is_exact_and_loss_falls():
    losses = assert_resume_exact("surgical", {"rgn_every": 2}, train_config(), steps=6, split=3)
    assert losses[-1] < 0.85 * losses[0]
    # Auto-RGN within a block (the embeddings and the first layer)
    method = build_method("surgical", {"layers": [0], "modules": ["embed_tokens"]})
    model, opt = setup(method, tiny(2), train_config())
    run(method, model, opt, range(2), train_config())
    assert set(method.weights) == _layer_names(model, [0]) | {"model.embed_tokens.weight"}
