"""Hand-computed checks of the scorers' and selectors' arithmetic (no model)."""

import itertools
import math

import numpy as np
import pytest

from tunelab.selection.registry import Pool, SelectionError, build_selector, resolve_budget
from tunelab.selection.scorers.composite import combine
from tunelab.selection.scorers.gradient import ROWS_PER_CHUNK, adam_direction, project, rademacher_chunk
from tunelab.selection.scorers.ifd import ifd_from_losses
from tunelab.selection.scorers.judge import expected_rating
from tunelab.selection.selectors.kcenter import covering_radius, greedy_k_center
from tunelab.selection.selectors.qdit import lazy_greedy, qdit_objective, scaled_quality


def unit(rows):
    x = np.asarray(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- IFD ------------------------------------------------------------------------------------------

def test_ifd_both_variants_from_known_token_losses():
    cond = np.array([1.0, 2.0, 3.0])  # mean 2
    uncond = np.array([2.0, 4.0, 6.0, 4.0][:3])  # mean 4
    # Cherry LLM: ratio of mean losses
    assert ifd_from_losses(cond, uncond, "loss") == pytest.approx(0.5)
    # Superfiltering: ratio of perplexities = e^2 / e^4
    assert ifd_from_losses(cond, uncond, "ppl") == pytest.approx(math.exp(2) / math.exp(4))
    # the two variants disagree in value but agree on which side of 1 a sample falls
    assert ifd_from_losses(uncond, cond, "loss") == pytest.approx(2.0)
    assert ifd_from_losses(uncond, cond, "ppl") == pytest.approx(math.exp(2))
    assert ifd_from_losses(np.array([1.5]), np.array([1.5]), "ppl") == pytest.approx(1.0)


def test_ifd_ppl_does_not_overflow():
    assert ifd_from_losses(np.array([800.0]), np.array([799.0]), "ppl") == pytest.approx(math.e)


# -- judge, composite, LESS pieces ----------------------------------------------------------------

def test_expected_rating_is_the_renormalised_expectation():
    p = np.array([[0.1, 0.2, 0.3, 0.2, 0.1, 0.05]])  # sums to 0.95: renormalised
    expected = (p / p.sum() * np.arange(1, 7)).sum()
    assert expected_rating(np.log(p))[0] == pytest.approx(expected)
    certain = np.log(np.array([[1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1.0]]))
    assert expected_rating(certain)[0] == pytest.approx(6.0, abs=1e-6)


def test_composite_combinations():
    a, b = np.array([2.0, 3.0]), np.array([4.0, 0.5])
    assert combine([a, b], "product").tolist() == [8.0, 1.5]
    assert combine([a, b], "sum").tolist() == [6.0, 3.5]
    assert combine([a, b], "mean", [1.0, 3.0]).tolist() == pytest.approx([(2 + 12) / 4, (3 + 1.5) / 4])
    assert combine([a, b], "product", [2.0, 1.0]).tolist() == [16.0, 4.5]


def test_adam_direction_is_less_obtain_gradients_with_adam():
    """LESS (collect_grad_reps.obtain_gradients_with_adam): m' / sqrt(v' + eps), eps INSIDE the root. The
    second entry (g = 0, v = 0) is where it matters: m' / sqrt(eps) = 0.09 / 1e-4, where the old
    m' / (sqrt(v') + eps) gave 0.09 / 1e-8."""
    g, m, v = np.array([0.5, 0.0]), np.array([0.1, 0.1]), np.array([0.04, 0.0])
    b1, b2, eps = 0.9, 0.999, 1e-8
    import torch

    out = adam_direction(torch.tensor(g), torch.tensor(m), torch.tensor(v), (b1, b2), eps).numpy()
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    assert out == pytest.approx(m1 / np.sqrt(v1 + eps))
    assert out[1] == pytest.approx(0.09 / 1e-4)


def test_less_checkpoint_weights_are_the_mean_lr_of_each_epoch():
    """LESS's matching.py weights checkpoint c by the mean learning rate of epoch c, renormalised to 1; the
    linear schedule with warm-up is HF's (ceil(0.03 * total) warm-up steps)."""
    from tunelab.selection.scorers.gradient import checkpoint_weights, linear_schedule

    f = linear_schedule(8, 0.25)  # 2 warm-up steps, then 6 decaying steps
    assert [f(k) for k in range(8)] == pytest.approx([0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    lrs = [[f(k) for k in range(4)], [f(k) for k in range(4, 8)]]  # two epochs of 4 steps
    m0, m1 = (0 + 0.5 + 1 + 5 / 6) / 4, (4 / 6 + 3 / 6 + 2 / 6 + 1 / 6) / 4
    assert checkpoint_weights(lrs) == pytest.approx([m0 / (m0 + m1), m1 / (m0 + m1)])


def test_rademacher_projection():
    import torch

    r = rademacher_chunk(3, 0, 100, 16)
    assert set(np.unique(r.numpy() * 4).tolist()) == {-1.0, 1.0}  # +-1/sqrt(16)
    assert torch.equal(r, rademacher_chunk(3, 0, 100, 16))  # regenerated identically
    # the projection of a gradient longer than one chunk equals the product with the whole matrix
    d, dim = ROWS_PER_CHUNK + 10, 8
    g = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    full = torch.cat([rademacher_chunk(5, 0, ROWS_PER_CHUNK, dim), rademacher_chunk(5, 1, 10, dim)])
    assert torch.allclose(project(g, dim, 5), g @ full, atol=1e-3)
    # inner products preserved in expectation (Johnson-Lindenstrauss): a large d keeps norms close
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(1))
    px = project(x, 2048, 0)
    assert torch.allclose(px.norm(dim=1) / x.norm(dim=1), torch.ones(3), atol=0.1)


# -- budgets --------------------------------------------------------------------------------------

def test_budget_resolution_and_errors():
    assert resolve_budget("10%", 200, 200) == 20
    assert resolve_budget("0.5%", 100, 100) == 1  # never rounds to nothing
    assert resolve_budget(7, 100, 50) == 7
    assert resolve_budget(None, 100, 50) is None
    with pytest.raises(SelectionError, match="selects nothing"):
        resolve_budget(0, 100, 100)
    with pytest.raises(SelectionError, match="percentage"):
        resolve_budget("0%", 100, 100)
    with pytest.raises(SelectionError, match="larger than the pool: 10 candidates"):
        resolve_budget(11, 100, 10)
    with pytest.raises(SelectionError, match="larger than the pool"):
        resolve_budget("100%", 100, 90)


# -- selectors ------------------------------------------------------------------------------------

def _select(name, pool, budget, **opts):
    return build_selector(name, opts).select(pool, budget).tolist()


def test_topk_random_threshold():
    s = np.array([0.3, 0.9, 0.1, 0.9, 0.5])
    pool = Pool([None] * 5, scores=s, raw_scores=s, seed=1)
    assert _select("topk", pool, 3) == [1, 3, 4]  # ties by position
    r = _select("random", pool, 3)
    assert len(set(r)) == 3 and r == _select("random", pool, 3)  # seeded
    assert _select("threshold", pool, None, min=0.3, max=0.6) == [4, 0]
    assert _select("threshold", pool, 1, min=0.3) == [1]
    # thresholds apply to the raw scores even when lower is preferred
    neg = Pool([None] * 5, scores=-s, raw_scores=s)
    assert _select("threshold", neg, None, max=0.5) == [2, 0, 4]


def test_kcenter_greedy_by_hand_and_covering_radius():
    # points on a line (as 1-d vectors): 0, 1, 2, 10, 11, 20
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    centers, radius = greedy_k_center(x, 3, first=0)
    # from 0: farthest is 20; then the point farthest from {0, 20} is 10 (distance 10)
    assert centers.tolist() == [0, 5, 3]
    assert radius == pytest.approx(2.0)  # point 2 is 2 from 0; 11 is 1 from 10
    assert covering_radius(x, centers) == pytest.approx(radius)
    # greedy is within 2x of the optimal k-center radius (brute force)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = rng.normal(size=(9, 2))
        for k in (2, 3, 4):
            c, r = greedy_k_center(pts, k, first=0)
            best = min(covering_radius(pts, s) for s in itertools.combinations(range(9), k))
            assert best - 1e-12 <= r <= 2 * best + 1e-12


def test_kcenter_selector_starts_at_best_score():
    emb = unit([[1, 0], [0.2, 1], [1, 0.1], [-1, 0]]).astype(np.float32)
    pool = Pool([None] * 4, scores=np.array([0.0, 5.0, 0.0, 0.0]), embeddings=emb)
    out = _select("kcenter", pool, 2)
    assert out == [1, 3]  # starts at the best-scored point, then the farthest from it
    assert pool.report["covering_radius"] > 0


def test_deita_threshold_behaviour():
    # 0 and 1 are near-identical, 2 is orthogonal, 3 is close to 2
    emb = unit([[1, 0, 0], [1, 0.05, 0], [0, 1, 0], [0, 1, 0.3]]).astype(np.float32)
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    pool = Pool([None] * 4, scores=scores, embeddings=emb)
    # cos(0,1) ~ 0.9988, cos(2,3) ~ 0.958: at 0.9 both near-copies are skipped
    assert _select("deita", pool, 2, threshold=0.9) == [0, 2]
    assert _select("deita", pool, 4, threshold=0.9) == [0, 2]  # pool exhausted: fewer returned
    # at 0.97, 3 is far enough from 2 but 1 is still a copy of 0
    assert _select("deita", pool, 3, threshold=0.97) == [0, 2, 3]
    # at 0.999 nothing is a copy: plain top-k
    assert _select("deita", pool, 4, threshold=0.999) == [0, 1, 2, 3]


def test_qdit_lazy_greedy_equals_greedy_and_brute_force_bound():
    rng = np.random.default_rng(0)
    for trial in range(4):
        emb = unit(rng.normal(size=(8, 3)))
        q = scaled_quality(rng.random(8), 8)
        for alpha in (0.0, 0.3, 1.0):
            k = 3
            chosen, _ = lazy_greedy(emb, q, k, alpha)
            # plain greedy on the directly computed objective
            sel: list[int] = []
            for _ in range(k):
                gains = [(qdit_objective(emb, q, sel + [j], alpha, k), -j) for j in range(8) if j not in sel]
                sel.append(-max(gains)[1])
            # same picks as plain greedy (up to exact ties in gain, hence compared by value)
            assert qdit_objective(emb, q, chosen, alpha, k) == pytest.approx(qdit_objective(emb, q, sel, alpha, k))
            f_greedy = qdit_objective(emb, q, chosen, alpha, k)
            opt = max(qdit_objective(emb, q, s, alpha, k) for s in itertools.combinations(range(8), k))
            assert (1 - 1 / math.e) * opt - 1e-12 <= f_greedy <= opt + 1e-12


def test_facility_location_objective_by_hand():
    emb = unit([[1, 0], [0, 1], [1, 1]])
    q = np.array([0.0, 1.0, 0.5])
    # S = {2}: similarities to [1,1]/sqrt2 are (0.7071, 0.7071, 1): d = 2.4142/3; q = 0.5/k with k = 1
    assert qdit_objective(emb, q, [2], 0.0, 1) == pytest.approx((2 * 2 ** -0.5 + 1) / 3)
    assert qdit_objective(emb, q, [2], 1.0, 1) == pytest.approx(0.5)
    # negative similarities count as 0
    emb2 = unit([[1, 0], [-1, 0]])
    assert qdit_objective(emb2, np.zeros(2), [0], 0.0, 1) == pytest.approx(0.5)


def test_cluster_rank_takes_the_best_of_each_cluster_first():
    # two tight clusters; the best scores all sit in cluster A
    emb = unit([[1, 0.01], [1, 0.02], [1, 0.03], [0.01, 1], [0.02, 1]]).astype(np.float32)
    scores = np.array([5.0, 4.0, 3.0, 1.0, 0.5])
    pool = Pool([None] * 5, scores=scores, embeddings=emb)
    assert _select("cluster_rank", pool, 3, n_clusters=2) == [0, 3, 1]  # best of A, best of B, then best left
    assert pool.report["clusters"] == 2
    assert _select("cluster_rank", pool, 1, n_clusters=2) == [0]


def test_grape_keeps_the_most_likely_response_per_instruction():
    from tunelab.data.formats import ChatExample

    def ex(q, a):
        return ChatExample([{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    examples = [ex("q1", "a"), ex("q1", "b"), ex("q2", "c"), ex("q1", "d"), ex("q2", "e")]
    ppl = np.array([3.0, 1.5, 9.0, 2.0, 4.0])
    pool = Pool(examples, scores=-ppl, raw_scores=ppl)  # perplexity: lower preferred
    assert _select("grape", pool, None) == [1, 4]
    assert pool.report == {"groups": 2, "groups_with_choice": 2}
    assert _select("grape", pool, 1) == [1]


def test_qdit_diversity_only_covers_near_duplicate_families_like_k_center():
    """QDIT at alpha = 0 is the authors' greedy facility location (alpha = 0 "reduces to the classical greedy
    facility-location algorithm", their section 3.2): on a pool of near-duplicate families of very different
    sizes it must pick one member of every family, at least as many families as k-center covers."""
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 5, 8, 13, 21, 34]
    centers = unit(rng.normal(size=(len(sizes), 32)))
    family = np.repeat(np.arange(len(sizes)), sizes)
    emb = unit(centers[family] + 0.05 * rng.normal(size=(len(family), 32)))
    scores = rng.random(len(family))
    pool = Pool([None] * len(family), scores=scores, raw_scores=scores, embeddings=emb)
    for budget in (len(sizes), len(sizes) + 4):
        q_fam = set(family[_select("qdit", pool, budget, alpha=0.0)].tolist())
        k_fam = set(family[_select("kcenter", pool, budget)].tolist())
        assert len(q_fam) == len(sizes) >= len(k_fam)
    # the largest families first when the budget is short (coverage = members represented)
    assert set(family[_select("qdit", pool, 3, alpha=0.0)].tolist()) == {5, 6, 7}


def test_lazy_greedy_picks_equal_plain_greedy_with_fewer_evaluations():
    rng = np.random.default_rng(3)
    emb = unit(rng.normal(size=(60, 8)))
    q = scaled_quality(rng.random(60), 60)
    k, alpha = 10, 0.5
    chosen, evaluations = lazy_greedy(emb, q, k, alpha, chunk=7)  # chunked initial gains
    sel: list[int] = []
    for _ in range(k):
        sel.append(max((j for j in range(60) if j not in sel),
                       key=lambda j: qdit_objective(emb, q, sel + [j], alpha, k)))
    assert chosen.tolist() == sel
    assert evaluations < 60 * k / 2
