"""gmt (GMT entries / SMT blocks) / lift / spiel: exactly which entries change, the masks and index sets
against independent computations, optimizer state at refreshes, sparse export + merge, resume, loss falls."""

import json

import pytest
import torch

from test_sparse_common import (assert_resume_exact, backend, run, setup, snapshot, task, tiny,
                                train_config)
from tunelab.methods.gmt import MaskedAdamW, blocks_to_mask
from tunelab.methods.lift import principal_mask
from tunelab.methods.registry import build_method
from tunelab.methods.spiel import SparseDelta, _deltas, apply_sparse_delta
from tunelab.objectives.base import build_objective
from tunelab.train.loop import forward_backward



def _targets(model):
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"}


def _grads_of_next_step(model, opt, batch):
    """Backward one step as the loop does and return the (clipped) gradients the optimizer will see."""
    forward_backward(model, build_objective("sft", {}), [batch], backend(), "fp32")
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    return {id(p): p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}


# -- MaskedAdamW -----------------------------------------------------------------------------------

def test_masked_adamw_with_full_masks_equals_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ref = torch.optim.AdamW([a], lr=0.1, weight_decay=0.05, foreach=False)
    ours = MaskedAdamW([b], lr=0.1, weight_decay=0.05, select=lambda ps, gs: [torch.ones_like(p, dtype=torch.bool)
                                                                             for p in ps])
    for _ in range(3):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)


def test_masked_adamw_leaves_unmasked_entries_and_moments_untouched():
    p = torch.nn.Parameter(torch.randn(4, 4))
    masks = iter([torch.eye(4, dtype=torch.bool), torch.eye(4, dtype=torch.bool).flip(0)])
    opt = MaskedAdamW([p], lr=0.1, weight_decay=0.1, select=lambda ps, gs: [next(masks)])
    p.grad = torch.ones(4, 4)
    opt.step()
    first = p.detach().clone()
    m_before = opt.state[p]["exp_avg"].clone()
    p.grad = torch.ones(4, 4)
    opt.step()
    second_mask = torch.eye(4, dtype=torch.bool).flip(0)
    assert torch.equal(p[~second_mask], first[~second_mask])
    assert torch.equal(opt.state[p]["exp_avg"][~second_mask], m_before[~second_mask])  # lazy: frozen moments


# -- GMT (entries) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["lazy", "dense"])
def test_gmt_updates_exactly_the_top_k_gradient_entries(state):
    method = build_method("gmt", {"density": 0.05, "optimizer_state": state})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    targets = _targets(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(targets)
    batch = task()
    for step in range(2):
        before = snapshot(model)
        grads = _grads_of_next_step(model, opt, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(model, step + 1, opt)
        for name, p in targets.items():
            k = max(1, round(0.05 * p.numel()))
            moved = p.detach() != before[name]
            top = torch.zeros(p.numel(), dtype=torch.bool)
            top[torch.topk(grads[id(p)].abs().flatten(), k).indices] = True
            if state == "lazy" or step == 0:
                assert torch.equal(moved.flatten(), top), name  # exactly the k largest-|g| entries
            else:  # plain AdamW momentum keeps moving the entries picked at step 1
                assert moved.sum() > k and moved.flatten()[top].all()
        untouched = set(before) - set(targets)
        assert all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in untouched)


def test_gmt_loss_falls_and_resume_is_exact():
    losses = assert_resume_exact("gmt", {"density": 0.1}, train_config(), steps=10, split=5)
    assert losses[-1] < 0.85 * losses[0]


# -- SMT (blocks) ----------------------------------------------------------------------------------

def test_smt_selects_top_blocks_once_and_updates_only_them():
    method = build_method("gmt", {"granularity": "block", "block_size": 16, "density": 0.25})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    q = model.model.layers[0].self_attn.q_proj.weight  # [64, 64] -> 4 x 4 blocks, 4 selected
    before = snapshot(model)
    grads = _grads_of_next_step(model, opt, task())
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.on_step_end(model, 1, opt)
    name = "model.layers.0.self_attn.q_proj.weight"
    block_mean = grads[id(q)].abs().view(4, 16, 4, 16).mean(dim=(1, 3)).flatten()  # [16] independent scores
    assert method.blocks[name] == sorted(torch.topk(block_mean, 4).indices.tolist())
    mask = blocks_to_mask(method.blocks[name], q.shape, 16)
    assert torch.equal(q.detach() != before[name], mask)
    # k_proj is [32, 64]: 2 x 4 blocks -> round(0.25 * 8) = 2 blocks
    assert len(method.blocks["model.layers.0.self_attn.k_proj.weight"]) == 2
    chosen = json.loads(json.dumps(method.state_dict()))["blocks"]
    run(method, model, opt, range(1, 3), tc)  # reselect_every defaults to 0 for blocks: the choice stays
    assert method.blocks == chosen
    assert torch.equal((q.detach() != before[name]) & ~mask, torch.zeros_like(mask))


def test_blocks_to_mask_handles_edge_blocks():
    m = blocks_to_mask([1, 2], torch.Size([5, 7]), 4)  # grid 2 x 2: block 1 = rows 0-3, cols 4-6
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[0:4, 4:7] = True
    expected[4:5, 0:4] = True
    assert torch.equal(m, expected)


def test_smt_resume_with_periodic_reselection_is_exact_and_loss_falls():
    losses = assert_resume_exact("gmt", {"granularity": "block", "block_size": 16, "density": 0.25,
                                         "reselect_every": 2}, train_config(), steps=8, split=3)
    assert losses[-1] < 0.85 * losses[0]


def test_gmt_entry_masks_must_be_per_step():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="reselect_every"):
        build_method("gmt", {"granularity": "entry", "reselect_every": 5})


# -- LIFT ------------------------------------------------------------------------------------------

def test_principal_mask_matches_a_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    approx = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    ref = torch.zeros(w.numel(), dtype=torch.bool)
    ref[approx.abs().flatten().argsort(descending=True)[:50]] = True
    assert torch.equal(principal_mask(w, rank=3, k=50).flatten(), ref)
    assert not torch.equal(principal_mask(w, rank=24, k=50), principal_mask(w, rank=3, k=50))  # rank matters


def test_lift_updates_only_principal_weights_and_refreshes_masks():
    method = build_method("lift", {"rank": 4, "density": 0.1, "update_interval": 3})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    targets = _targets(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(targets)
    masks = {n.removesuffix(".lift_mask") + ".weight": m for n, m in method.masks().items()}
    for name, w in targets.items():
        assert torch.equal(masks[name], principal_mask(w, 4, round(0.1 * w.numel())))
    start = snapshot(model)
    first = {n: m.clone() for n, m in masks.items()}
    run(method, model, opt, range(2), tc)  # steps 1-2: no refresh yet
    for name, w in targets.items():
        assert torch.equal(w.detach() != start[name], first[name]), name  # exactly the principal entries moved
    run(method, model, opt, range(2, 3), tc)  # step 3 ends with a refresh from the current weights
    for name, w in targets.items():
        assert torch.equal(masks[name], principal_mask(w, 4, round(0.1 * w.numel())))
        state = opt.state[w]
        assert not state["exp_avg"][~masks[name]].any() and not state["exp_avg_sq"][~masks[name]].any()
    assert any(not torch.equal(first[n], masks[n]) for n in masks)  # the principal set moved
    before = snapshot(model)
    run(method, model, opt, range(3, 4), tc)
    for name, w in targets.items():
        assert torch.equal(w.detach() != before[name], masks[name]), name  # only the NEW mask moves


def test_lift_resume_across_a_refresh_is_exact_and_loss_falls():
    losses = assert_resume_exact("lift", {"rank": 4, "density": 0.2, "update_interval": 4}, train_config(),
                                 steps=10, split=5)
    assert losses[-1] < 0.85 * losses[0]


# -- SpIEL -----------------------------------------------------------------------------------------

def test_spiel_delta_is_sparse_and_base_is_untouched():
    method = build_method("spiel", {"density": 0.05, "reselect_every": 50, "accumulation_steps": 2})
    base = tiny(2)
    w0 = {n: w.detach().clone() for n, w in _targets(base).items()}
    tc = train_config()
    model, opt = setup(method, base, tc)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.parametrizations.weight.0.values" for n in _deltas(model)}
    run(method, model, opt, range(3), tc)
    for name, d in _deltas(model).items():
        m = dict(model.named_modules())[name]
        assert torch.equal(m.parametrizations.weight.original, w0[f"{name}.weight"])  # W0 frozen
        w = m.weight.detach().flatten()  # effective W = W0 + scatter(idx, phi)
        assert torch.equal(w, w0[f"{name}.weight"].flatten().index_add(0, d.indices, d.values.detach()))
        moved = (w != w0[f"{name}.weight"].flatten()).nonzero().flatten()
        assert set(moved.tolist()) <= set(d.indices.tolist()) and moved.numel() > 0.9 * d.indices.numel()
        assert d.values.numel() == round(0.05 * w0[f"{name}.weight"].numel()) and (d.values != 0).all()
        assert d.indices.unique().numel() == d.indices.numel()


def test_spiel_prune_and_regrow_matches_an_independent_computation():
    method = build_method("spiel", {"density": 0.1, "reselect_every": 4, "accumulation_steps": 2,
                                    "drop_fraction": 0.25})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    deltas = _deltas(model)
    run(method, model, opt, range(1), tc)
    assert all(d.accum is None for d in deltas.values())
    run(method, model, opt, range(1, 2), tc)  # after step 2 the window for the update at step 4 opens
    assert all(d.accum is not None and not d.accum.any() for d in deltas.values())
    batch = task()
    run(method, model, opt, range(2, 3), tc, batch=batch)
    assert all(d.accum.any() for d in deltas.values())
    # step 4 by hand: backward, step, then compare the reselection with an independent recomputation
    forward_backward(model, build_objective("sft", {}), [batch], backend(), "fp32")
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {n: (d.indices.clone(), d.values.detach().clone(), d.accum.clone()) for n, d in deltas.items()}
    method.on_step_end(model, 4, opt)
    for n, d in deltas.items():
        idx, val, acc = before[n]
        k = idx.numel()
        n_drop = int(0.25 * k)
        slots = set(val.abs().argsort()[:n_drop].tolist())  # smallest |delta|
        remaining = {int(idx[i]) for i in range(k) if i not in slots}
        order = [int(j) for j in acc.abs().argsort(descending=True) if int(j) not in remaining]
        grown = set(order[:n_drop])  # largest |accumulated gradient| among the others
        now = d.indices.tolist()
        assert {now[i] for i in slots} == grown and all(now[i] == int(idx[i]) for i in range(k) if i not in slots)
        assert all(float(d.values.detach()[i]) == 0.0 for i in slots)
        st = opt.state[d.values]
        assert all(float(st["exp_avg"][i]) == 0.0 and float(st["exp_avg_sq"][i]) == 0.0 for i in slots)
        assert d.accum is None  # the dense accumulator is freed after the update


def test_spiel_resume_mid_window_is_exact_and_loss_falls():
    # updates at steps 4 and 8; the checkpoint at step 3 falls inside the accumulation window of step 4
    losses = assert_resume_exact("spiel", {"density": 0.2, "reselect_every": 4, "accumulation_steps": 2},
                                 train_config(), steps=9, split=3)
    assert losses[-1] < 0.85 * losses[0]


def test_spiel_sparse_export_merges_into_the_base(tmp_path):
    from safetensors.torch import load_file

    method = build_method("spiel", {"density": 0.05, "reselect_every": 50, "accumulation_steps": 2})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    run(method, model, opt, range(2), tc)
    method.save_adapter(model, str(tmp_path / "delta"))
    saved = load_file(str(tmp_path / "delta" / "sparse_delta.safetensors"))
    k_total = sum(d.values.numel() for d in _deltas(model).values())
    assert sum(t.numel() for key, t in saved.items() if key.endswith(".values")) == k_total  # sparse: k values
    assert all(t.dtype == torch.int64 for key, t in saved.items() if key.endswith(".indices"))
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
    merged = method.merged_model(model)
    assert not any(isinstance(m, SparseDelta) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny(2).state_dict())  # a plain model again
    rebuilt = apply_sparse_delta(tiny(2), tmp_path / "delta")
    for (n, a), (_, b) in zip(merged.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected_logits, rtol=0, atol=1e-5)
