"""Per-tensor ops on hand-computed tensors, and against peft.utils.merge_utils on random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as pm

from tunelab.merging import ops

T = torch.tensor
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning:UserWarning")


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else T(b), rtol=0, atol=atol)


# ---------------------------------------------------------------- hand-computed values
def test_linear_and_uniform_soup():
    a, b = T([1.0, 2.0, 3.0]), T([3.0, 6.0, 9.0])
    close(ops.linear([a, b]), [2.0, 4.0, 6.0])
    close(ops.linear([a, b], [1.0, 3.0]), [2.5, 5.0, 7.5])
    close(ops.linear([a, b], [1.0, 3.0], normalize=False), [10.0, 20.0, 30.0])
    with pytest.raises(ValueError, match="sum to zero"):
        ops.linear([a, b], [1.0, -1.0])


def test_task_arithmetic_hand():
    d1, d2 = T([1.0, -2.0, 0.0]), T([0.5, 1.0, -1.0])
    close(ops.task_arithmetic([d1, d2], [1.0, 2.0], lam=0.5), [1.0, 0.0, -1.0])
    close(ops.task_vector(T([3.0, 1.0]), T([1.0, 1.5])), [2.0, -0.5])


def test_magnitude_prune_hand():
    d = T([0.1, -3.0, 2.0, -0.5, 4.0])
    close(ops.magnitude_prune(d, 0.4), [0.0, -3.0, 0.0, 0.0, 4.0])  # k = int(0.4 * 5) = 2
    close(ops.magnitude_prune(d, 1.0), d)
    close(ops.magnitude_prune(d, 0.0), [0.0] * 5)


DS = [T([1.0, -2.0, 3.0, 0.5]), T([-2.0, 1.5, 1.0, 0.1]), T([0.5, -1.0, -4.0, 0.2])]


def test_ties_hand():
    # trim to 2 of 4: [0,-2,3,0], [-2,1.5,0,0], [0,-1,-4,0]; elected sign of sums [-2,-1.5,-1,0] -> [-,-,-,+]
    # disjoint mean over agreeing entries: [-2/1, (-2-1)/2, -4/1, 0]
    close(ops.ties(DS, 0.5), [-2.0, -1.5, -4.0, 0.0])
    # weights are applied after the election (peft): [-4/1, (-2*1 - 1*0.5)/2, -4*0.5/1, 0]
    close(ops.ties(DS, 0.5, [1.0, 2.0, 0.5]), [-4.0, -1.25, -2.0, 0.0])
    close(ops.ties(DS, 0.5, lam=2.0), [-4.0, -3.0, -8.0, 0.0])


def test_elect_sign_and_disjoint_mean_hand():
    s = torch.stack([T([1.0, -1.0, 0.0]), T([2.0, 3.0, 0.0]), T([-4.0, -1.0, 0.0])])
    # total: sums [-1, 1, 0] -> [-, +, +]; frequency: sign sums [1, -1, 0] -> [+, -, +]
    assert ops.elect_sign(s, "total").tolist() == [[False, False, False], [False, True, False], [True, False, False]]
    assert ops.elect_sign(s, "frequency").tolist() == [[True, True, False], [True, False, False], [False, True, False]]
    close(ops.disjoint_mean(s, ops.elect_sign(s, "total")), [-4.0, 3.0, 0.0])


def test_dare_prune_values():
    d = T([2.0, 4.0, 6.0, 8.0, -1.0, -3.0, 5.0, 7.0])
    out = ops.dare_prune(d, 0.25, torch.Generator().manual_seed(3))
    kept = out != 0
    assert 0 < kept.sum() < d.numel()
    close(out[kept], d[kept] * 4.0)  # survivors rescaled by 1 / (1 - p) = 1 / 0.25
    again = ops.dare_prune(d, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # reproducible with a seeded generator
    close(ops.dare_prune(d, 1.0), d)
    close(ops.dare_prune(d, 0.0), torch.zeros(8))
    close(ops.dare_prune(d, 0.25, torch.Generator().manual_seed(3), rescale=False), d * kept)
    big = ops.dare_prune(torch.ones(100_000), 0.3, torch.Generator().manual_seed(0))
    assert abs(big.mean().item() - 1.0) < 0.03  # expectation preserved


def test_slerp_hand():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    h = math.sqrt(0.5)
    close(ops.slerp(0.5, v0, v1), [h, h])
    assert ops.slerp(0.5, v0, v1).norm().item() == pytest.approx(1.0, abs=1e-6)  # stays on the sphere
    assert ops.linear([v0, v1]).norm().item() == pytest.approx(h, abs=1e-6)  # linear shrinks
    close(ops.slerp(1 / 3, v0, v1), [math.cos(math.pi / 6), 0.5])
    close(ops.slerp(0.5, T([2.0, 0.0]), v1), [2 * h, h])  # sin(pi/4)/sin(pi/2) on each endpoint


def test_slerp_endpoints_exact_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(ops.slerp(0.0, a, b), a)
    assert torch.equal(ops.slerp(1.0, a, b), b)
    close(ops.slerp(0.25, a, 2 * a), 1.25 * a)  # parallel: linear
    close(ops.slerp(0.25, a, -a), 0.5 * a)  # antiparallel: linear
    close(ops.slerp(0.5, torch.zeros(3), T([1.0, 2.0, 3.0])), [0.5, 1.0, 1.5])  # zero norm: linear
    with pytest.raises(ValueError, match="shape mismatch"):
        ops.slerp(0.5, a, torch.zeros(7, 5))


def test_slerp_matches_mergekit():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)  # one row: mergekit slerps per row
    for t in (0.1, 0.5, 0.8):
        close(ops.slerp(t, a, b), mk.slerp(torch.tensor(t), a, b), atol=1e-5)


def test_wise_ft_and_transfer_hand():
    close(ops.wise_ft(T([0.0, 2.0]), T([4.0, 6.0]), 0.25), [1.0, 3.0])
    close(ops.transfer(T([1.0, 1.0]), T([2.0, 0.0]), T([5.0, 5.0])), [6.0, 4.0])
    close(ops.transfer(T([1.0, 1.0]), T([2.0, 0.0]), T([5.0, 5.0]), weight=0.5), [5.5, 4.5])


def test_model_stock_hand():
    base = T([1.0, 1.0])
    s3 = math.sqrt(3) / 2
    ft1, ft2 = T([2.0, 1.0]), T([1.5, 1.0 + s3])  # deltas [1,0] and [0.5, s3]: cos = 0.5
    # t = N cos / (1 + (N-1) cos) = 1 / 1.5 = 2/3; mean delta = [0.75, s3/2]
    close(ops.model_stock(base, [ft1, ft2]), [1.0 + 0.5, 1.0 + s3 / 3])
    # orthogonal deltas: cos = 0 -> t = 0 -> base
    close(ops.model_stock(base, [T([2.0, 1.0]), T([1.0, 3.0])]), base)
    # identical deltas: cos = 1 -> t = 1 -> the average
    close(ops.model_stock(base, [T([2.0, 3.0]), T([2.0, 3.0]), T([2.0, 3.0])]), [2.0, 3.0])
    with pytest.raises(ValueError):
        ops.model_stock(base, [ft1])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(filter_wise):
    """Per tensor (the paper's layer-wise t, mergekit's default) and per row (mergekit's filter_wise)."""
    mk = pytest.importorskip("mergekit.merge_methods.model_stock")
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(0)
    for shape in ((6, 5), (7,)):
        base = torch.randn(shape, generator=g)
        common = torch.randn(shape, generator=g)
        fts = [base + 0.5 * common + 0.3 * torch.randn(shape, generator=g) for _ in range(3)]
        want = mk.model_stock_merge_method.implementation(TensorGroup.from_tensors([base, *fts], base_index=0),
                                                          filter_wise=filter_wise)
        close(ops.model_stock(base, fts, filter_wise=filter_wise), want)
    assert not torch.allclose(ops.model_stock(base.expand(3, 7), [f.expand(3, 7) * torch.tensor([[1.0], [2.0], [-1.0]])
                                                                   for f in fts], filter_wise=True),
                              ops.model_stock(base.expand(3, 7), [f.expand(3, 7) * torch.tensor([[1.0], [2.0], [-1.0]])
                                                                   for f in fts]))


def test_lines_hand():
    assert ops.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert ops.layer_index("model.norm.weight") is None
    s = [ops.lines_scale(f"model.layers.{i}.mlp.up_proj.weight", 3, alpha=0.2) for i in range(3)]
    assert s == pytest.approx([0.2, 0.6, 1.0])
    # outside the blocks (embeddings, final norm, head): alpha, as the authors' LiNeS_scaling ("scale with alpha
    # for layers outside residual blocks"); the old rule gave the final norm and an untied head alpha + beta
    assert ops.lines_scale("model.embed_tokens.weight", 3, alpha=0.2) == pytest.approx(0.2)
    assert ops.lines_scale("model.norm.weight", 3, alpha=0.2) == pytest.approx(0.2)
    assert ops.lines_scale("lm_head.weight", 3, alpha=0.2, beta=0.5) == pytest.approx(0.2)
    assert ops.lines_scale("lm_head.weight", 3, non_layer_scale=0.5) == 0.5
    close(ops.lines(T([1.0, 2.0]), "model.layers.1.mlp.down_proj.weight", 3, alpha=0.2), [0.6, 1.2])
    with pytest.raises(ValueError, match="layer index 5"):
        ops.lines_scale("model.layers.5.x.weight", 3)


def test_shape_mismatch_names_tensor():
    with pytest.raises(ValueError, match="'model.layers.0.q.weight'"):
        ops.check_same_shape([torch.zeros(2, 3), torch.zeros(3, 2)], "model.layers.0.q.weight")
    with pytest.raises(ValueError, match="density"):
        ops.ties([torch.zeros(3)], 1.5)


# ---------------------------------------------------------------- peft.utils.merge_utils
W = [0.5, 1.0, 0.7]


def _tasks(seed=0, shape=(16, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def test_task_arithmetic_and_linear_vs_peft():
    ts = _tasks()
    close(ops.task_arithmetic(ts, W), pm.task_arithmetic(ts, T(W)))
    close(ops.task_arithmetic(ts, W, lam=0.3), 0.3 * pm.task_arithmetic(ts, T(W)))
    close(ops.linear(ts, W), pm.task_arithmetic(ts, T(W) / sum(W)))


def test_magnitude_prune_vs_peft():
    ts = _tasks(1)
    for density in (0.0, 0.1, 0.35, 0.9):
        assert torch.equal(ops.magnitude_prune(ts[0], density), pm.prune(ts[0], density, "magnitude"))
    pruned = [ops.magnitude_prune(t, 0.3) for t in ts]
    close(ops.task_arithmetic(pruned, W), pm.magnitude_prune(ts, T(W), 0.3))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_vs_peft(sign_method, density):
    ts = _tasks(2)
    close(ops.ties(ts, density, W, sign_method), pm.ties(ts, T(W), density, sign_method))


def test_dare_vs_peft_same_mask():
    ts = _tasks(3)
    for seed in (0, 5):
        torch.manual_seed(seed)
        ref = pm.dare_linear(ts, T(W), 0.4)
        mine = ops.dare_linear(ts, 0.4, torch.Generator().manual_seed(seed), W)
        close(mine, ref)
        torch.manual_seed(seed)
        ref = pm.dare_ties(ts, T(W), 0.4, "total")
        mine = ops.dare_ties(ts, 0.4, torch.Generator().manual_seed(seed), W, "total")
        close(mine, ref)
    torch.manual_seed(9)
    ref_single = pm.prune(ts[0], 0.4, "random", rescale=True)
    assert torch.equal(ops.dare_prune(ts[0], 0.4, torch.Generator().manual_seed(9)), ref_single)
