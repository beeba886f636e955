"""The preference losses and token_kl against TRL's own code on the same log-probs.

TRL 1.16 has no standalone loss functions for DPO and KTO: the losses live inside
`DPOTrainer._compute_loss` / `KTOTrainer._compute_loss`, which run a model. We therefore call
those methods on trainer objects made with `object.__new__` (no __init__, no model, no dataset),
setting exactly the attributes the methods read, with:
  * `precompute_ref_logps=True`, so the reference log-probs are read from the batch
    (`ref_chosen_logps`/`ref_rejected_logps`, `ref_logps`/`ref_KL_logps`), and
  * a fake policy whose forward returns TRL's fused-head output fields (`log_probs` per token,
    and `entropy`/`mean_logits`/`is_top1` for TRL's logging), with per-token log-probs chosen so
    that each sequence's sum is the value we feed to our function.
The loss those methods return is a batch mean, so each example is also run as a batch of one,
which gives per-example losses and (from `_metrics`) per-example rewards.
CPO (SimPO) and ORPO have standalone loss methods (`cpo_loss`, `odds_ratio_loss`); the GKD
trainer has a static `generalized_jsd_loss`.
"""

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.objectives.distill import token_kl
from tunelab.objectives.preference_losses import (
    dpo_sigmoid,
    hinge,
    ipo,
    kto,
    kto_kl_estimate,
    orpo,
    robust_dpo,
    rpo_nll,
    simpo,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.orpo import ORPOTrainer

TOL = 1e-6
D = torch.float64
T = 8  # sequence length of the fake batches
MAX_DIFF: dict[str, float] = {}  # filled by the comparisons, printed when the module's tests are done


def _record(name, a, b):
    d = float((torch.as_tensor(a, dtype=D) - torch.as_tensor(b, dtype=D)).abs().max())
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), d)
    assert d <= TOL, f"{name}: max abs diff {d}"


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs(request):
    """After this module's comparisons, whichever ran and in whatever order (`-k`, `-p randomly`, xdist), print
    the max |ours - TRL| of each; every comparison has already asserted its own bound."""
    yield
    if not MAX_DIFF:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nmax |ours - TRL|:")
        for k, v in sorted(MAX_DIFF.items()):
            print(f"  {k}: {v:.3e}")


def test_a_comparison_beyond_the_tolerance_fails():
    """The bound each comparison asserts is live (a loose or missing check would let every test pass)."""
    with pytest.raises(AssertionError, match="max abs diff"):
        _record("self-check", torch.zeros(3), torch.tensor([0.0, 2 * TOL, 0.0]))
    MAX_DIFF.pop("self-check")
    _record("self-check", torch.zeros(3), torch.full((3,), TOL / 2))
    assert MAX_DIFF.pop("self-check") == pytest.approx(TOL / 2)


class FakeAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m


class FakePolicy:
    """Stands in for a model called with `fused_lm_head=True`: returns fixed per-token log-probs.

    `table` maps an input_ids tensor to the per-token log-probs [N, T-1] it should produce.
    """

    training = True

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids=None, **kwargs):
        for ids, lp in self.table:
            if torch.equal(ids, input_ids):
                z = torch.zeros_like(lp)
                return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)
        raise KeyError("unexpected input_ids")


def _sequences(totals, lengths):
    """input_ids, attention_mask, completion_mask [N, T] and per-token log-probs [N, T-1] whose
    completion tokens (the last `length` positions) carry total/length each."""
    n = len(totals)
    ids = torch.randint(1, 100, (n, T))
    att = torch.ones(n, T, dtype=torch.long)
    comp = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(lengths):
        comp[i, T - L :] = 1
    lp = torch.zeros(n, T - 1, dtype=D)
    shift = comp[:, 1:].bool()
    for i in range(n):
        lp[i, shift[i]] = totals[i] / lengths[i]
    return ids, att, comp, lp


def _data(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    pol_c = -torch.rand(b, generator=g, dtype=D) * 30 - 2
    pol_r = -torch.rand(b, generator=g, dtype=D) * 30 - 2
    ref_c = pol_c + torch.randn(b, generator=g, dtype=D) * 3
    ref_r = pol_r + torch.randn(b, generator=g, dtype=D) * 3
    n_c = torch.randint(1, T - 1, (b,), generator=g)
    n_r = torch.randint(1, T - 1, (b,), generator=g)
    return pol_c, pol_r, ref_c, ref_r, n_c, n_r


def _trl_dpo(loss_type, beta, label_smoothing, pol_c, pol_r, ref_c, ref_r, n_c, n_r, loss_weights=(1.0,)):
    """TRL's DPOTrainer._compute_loss on these log-probs -> (mean loss, mean chosen reward, mean rejected reward).

    `loss_type` may be a list (TRL's multi-loss combination, weighted by `loss_weights`)."""
    tr = object.__new__(DPOTrainer)
    totals = torch.cat([pol_c, pol_r]).tolist()
    ids, att, comp, lp = _sequences(totals, torch.cat([n_c, n_r]).tolist())
    policy = FakePolicy([(ids, lp)])
    tr.model = policy
    tr.accelerator = FakeAccelerator()
    tr.aux_loss_enabled = False
    tr.ld_alpha = None
    tr.precompute_ref_logps = True
    tr.f_divergence_type = "reverse_kl"
    tr.loss_types = list(loss_type) if isinstance(loss_type, (list, tuple)) else [loss_type]
    tr.loss_weights = list(loss_weights)
    tr.beta = beta
    tr.label_smoothing = label_smoothing
    tr.use_weighting = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    inputs = {
        "input_ids": ids,
        "attention_mask": att,
        "completion_mask": comp,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = tr._compute_loss(policy, inputs, return_outputs=False)
    m = tr._metrics["train"]
    return loss, m["rewards/chosen"][-1], m["rewards/rejected"][-1]


OURS = {
    "sigmoid": lambda pc, pr, rc, rr, nc, nr, beta, ls: dpo_sigmoid(pc, pr, rc, rr, beta),
    "ipo": lambda pc, pr, rc, rr, nc, nr, beta, ls: ipo(pc, pr, rc, rr, beta, nc, nr),
    "hinge": lambda pc, pr, rc, rr, nc, nr, beta, ls: hinge(pc, pr, rc, rr, beta),
    "robust": lambda pc, pr, rc, rr, nc, nr, beta, ls: robust_dpo(pc, pr, rc, rr, beta, ls),
}


@pytest.mark.parametrize(
    "loss_type,beta,ls,seed",
    [("sigmoid", 0.1, 0.0, 1), ("ipo", 0.5, 0.0, 2), ("hinge", 1.0, 0.0, 3), ("robust", 0.1, 0.2, 4),
     ("robust", 0.3, 0.0, 5)],
)
def test_dpo_family_vs_trl_dpotrainer(loss_type, beta, ls, seed):
    pc, pr, rc, rr, nc, nr = _data(seed=seed)
    ours = OURS[loss_type](pc, pr, rc, rr, nc, nr, beta, ls)
    assert ours.losses.shape == (4,)
    if loss_type == "hinge":  # the batch must exercise both sides of the hinge
        assert (ours.losses > 0).any() and (ours.losses == 0).any()
    # whole batch: TRL returns the mean
    loss, _, _ = _trl_dpo(loss_type, beta, ls, pc, pr, rc, rr, nc, nr)
    _record(f"DPOTrainer[{loss_type}] batch mean", ours.losses.mean(), loss)
    # one pair at a time: per-example losses and rewards
    for i in range(4):
        s = slice(i, i + 1)
        loss, rew_c, rew_r = _trl_dpo(loss_type, beta, ls, pc[s], pr[s], rc[s], rr[s], nc[s], nr[s])
        _record(f"DPOTrainer[{loss_type}] per pair", ours.losses[i], loss)
        _record(f"DPOTrainer[{loss_type}] rewards", ours.chosen_rewards[i], rew_c)
        _record(f"DPOTrainer[{loss_type}] rewards", ours.rejected_rewards[i], rew_r)


def test_rpo_alpha_vs_trl():
    """DPO + rpo_alpha * NLL(chosen): TRL's `rpo_alpha` is, in TRL 1.16, loss_type=["sigmoid", "sft"] with
    loss_weights=[1, alpha]; its "sft" term is the chosen NLL's token mean over the batch, ours the per-pair
    mean (RPO's Eq. 2). Equal per pair, and on a batch whose chosen responses have equal lengths."""
    alpha, beta = 0.7, 0.1
    pc, pr, rc, rr, nc, nr = _data(seed=8)
    ours = dpo_sigmoid(pc, pr, rc, rr, beta).losses + alpha * rpo_nll(pc, nc)
    torch.testing.assert_close(rpo_nll(pc, nc), -pc / nc.to(D))  # the chosen response's NLL per token
    for i in range(4):
        s = slice(i, i + 1)
        loss, _, _ = _trl_dpo(["sigmoid", "sft"], beta, 0.0, pc[s], pr[s], rc[s], rr[s], nc[s], nr[s],
                              loss_weights=(1.0, alpha))
        _record("DPOTrainer[sigmoid + alpha * sft] per pair (rpo_alpha)", ours[i], loss)
    same = torch.full_like(nc, 5)
    ours_same = dpo_sigmoid(pc, pr, rc, rr, beta).losses + alpha * rpo_nll(pc, same)
    loss, _, _ = _trl_dpo(["sigmoid", "sft"], beta, 0.0, pc, pr, rc, rr, same, nr, loss_weights=(1.0, alpha))
    _record("DPOTrainer[sigmoid + alpha * sft] batch, equal chosen lengths", ours_same.mean(), loss)
    # unequal lengths: TRL's batch token mean weights long responses more; ours is the mean over pairs
    loss, _, _ = _trl_dpo(["sigmoid", "sft"], beta, 0.0, pc, pr, rc, rr, nc, nr, loss_weights=(1.0, alpha))
    assert len(set(nc.tolist())) > 1 and abs(float(ours.mean()) - float(loss)) > 1e-3


def _cpo(loss_type, beta, label_smoothing, simpo_gamma=0.5):
    tr = object.__new__(CPOTrainer)
    tr.accelerator = FakeAccelerator()
    tr.alpha = 0.0  # no AlphaPO transform
    tr.loss_type = loss_type
    tr.beta = beta
    tr.label_smoothing = label_smoothing
    tr.simpo_gamma = simpo_gamma
    return tr


def test_cdpo_label_smoothing_vs_trl():
    """cDPO: TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid", so compare with
    (a) CPOTrainer.cpo_loss(loss_type="sigmoid", label_smoothing=e) fed the log-ratios
        (pol - ref) as its "policy log-probs" (same formula, with the reference folded in), and
    (b) (1-e) * DPOTrainer["sigmoid"](chosen, rejected) + e * DPOTrainer["sigmoid"](rejected, chosen)."""
    beta, eps = 0.2, 0.15
    pc, pr, rc, rr, nc, nr = _data(seed=7)
    ours = dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing=eps)
    losses, _, _ = _cpo("sigmoid", beta, eps).cpo_loss(pc - rc, pr - rr)
    _record("CPOTrainer.cpo_loss[sigmoid, label_smoothing] on log-ratios", ours.losses, losses)
    for i in range(4):
        s = slice(i, i + 1)
        fwd, _, _ = _trl_dpo("sigmoid", beta, 0.0, pc[s], pr[s], rc[s], rr[s], nc[s], nr[s])
        swp, _, _ = _trl_dpo("sigmoid", beta, 0.0, pr[s], pc[s], rr[s], rc[s], nr[s], nc[s])
        _record("DPOTrainer[sigmoid] (1-e)*fwd + e*swapped", ours.losses[i], (1 - eps) * fwd + eps * swp)


def test_simpo_vs_trl_cpo():
    beta, gamma = 2.0, 1.2
    g = torch.Generator().manual_seed(3)
    c_avg = -torch.rand(6, generator=g, dtype=D) * 3
    r_avg = -torch.rand(6, generator=g, dtype=D) * 3
    for ls in (0.0, 0.1):
        ours = simpo(c_avg, r_avg, beta, gamma, label_smoothing=ls)
        losses, rew_c, rew_r = _cpo("simpo", beta, ls, simpo_gamma=gamma).cpo_loss(c_avg, r_avg)
        _record("CPOTrainer.cpo_loss[simpo]", ours.losses, losses)
        _record("CPOTrainer.cpo_loss[simpo] rewards", ours.chosen_rewards, rew_c)
        _record("CPOTrainer.cpo_loss[simpo] rewards", ours.rejected_rewards, rew_r)


def test_orpo_vs_trl():
    lam = 0.25
    g = torch.Generator().manual_seed(4)
    # include averages on both sides of -log 2 (the two branches of log1mexp) and near 0
    c_avg = torch.cat([-torch.rand(6, generator=g, dtype=D) * 4, torch.tensor([-1e-4, -0.69, -0.7], dtype=D)])
    r_avg = torch.cat([-torch.rand(6, generator=g, dtype=D) * 4, torch.tensor([-3.0, -0.70, -0.69], dtype=D)])
    tr = object.__new__(ORPOTrainer)
    tr.accelerator = FakeAccelerator()
    tr.beta = lam
    losses, rew_c, rew_r, _, _ = tr.odds_ratio_loss(c_avg, r_avg)
    ours = orpo(c_avg, r_avg, lam)
    # TRL's "losses" are +lam*log sigmoid(.), subtracted from the NLL: ours are the loss to add
    _record("ORPOTrainer.odds_ratio_loss", ours.losses, -losses)
    _record("ORPOTrainer.odds_ratio_loss rewards", ours.chosen_rewards, rew_c)
    _record("ORPOTrainer.odds_ratio_loss rewards", ours.rejected_rewards, rew_r)


def _trl_kto(beta, w_d, w_u, pol, ref, desirable, pol_kl, ref_kl):
    tr = object.__new__(KTOTrainer)
    lengths = torch.randint(1, T - 1, (len(pol),)).tolist()
    ids, att, comp, lp = _sequences(pol.tolist(), lengths)
    kl_ids, kl_att, kl_comp, kl_lp = _sequences(pol_kl.tolist(), [3] * len(pol_kl))
    kl_ids = kl_ids + 1000  # distinct from ids, so the fake policy can tell the two forwards apart
    policy = FakePolicy([(ids, lp), (kl_ids, kl_lp)])
    tr.model = policy
    tr.accelerator = FakeAccelerator()
    tr.calculate_KL = True
    tr.precompute_ref_logps = True
    tr.loss_type = "kto"
    tr.beta = beta
    tr.desirable_weight = w_d
    tr.undesirable_weight = w_u
    tr.aux_loss_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    inputs = {
        "input_ids": ids,
        "attention_mask": att,
        "completion_mask": comp,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_att,
        "KL_completion_mask": kl_comp,
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = tr._compute_loss(policy, inputs, return_outputs=False)
    return loss, tr._metrics["train"]


@pytest.mark.parametrize("kl_shift", [0.3, -5.0])  # z0 > 0, and a negative mean that TRL clamps to 0
def test_kto_vs_trl_ktotrainer(kl_shift):
    beta, w_d, w_u = 0.3, 1.0, 1.33
    g = torch.Generator().manual_seed(5)
    pol = -torch.rand(6, generator=g, dtype=D) * 20 - 1
    ref = pol + torch.randn(6, generator=g, dtype=D) * 4
    desirable = torch.tensor([True, False, True, True, False, False])
    ref_kl = -torch.rand(5, generator=g, dtype=D) * 20 - 1
    pol_kl = ref_kl + kl_shift + torch.randn(5, generator=g, dtype=D) * 0.1
    z0 = kto_kl_estimate(pol_kl, ref_kl)
    ours = kto(pol, ref, desirable, z0, beta, w_d, w_u)

    loss, m = _trl_kto(beta, w_d, w_u, pol, ref, desirable, pol_kl, ref_kl)
    _record("KTOTrainer kl (z0)", z0, m["kl"][-1])
    _record("KTOTrainer batch mean", ours.losses.mean(), loss)
    _record("KTOTrainer rewards", ours.chosen_rewards.mean(), m["rewards/chosen"][-1])
    _record("KTOTrainer rewards", ours.rejected_rewards.mean(), m["rewards/rejected"][-1])
    for i in range(6):
        s = slice(i, i + 1)
        loss, _ = _trl_kto(beta, w_d, w_u, pol[s], ref[s], desirable[s], pol_kl, ref_kl)
        _record("KTOTrainer per example", ours.losses[i], loss)


@pytest.mark.parametrize("direction,jsd_beta", [("forward", 0.0), ("reverse", 1.0)])
def test_token_kl_vs_trl_gkd(direction, jsd_beta):
    """GKD's generalized JSD is forward KL(teacher||student) at beta=0 and reverse at beta=1, without T^2."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 11, generator=g, dtype=D) * 2
    te = torch.randn(2, 5, 11, generator=g, dtype=D) * 2
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, 2, -100, -100, -100]])
    temp = 1.7
    ours = token_kl(s, te, labels != -100, temp, direction)
    trl_jsd = GKDTrainer.generalized_jsd_loss(s, te, labels=labels, beta=jsd_beta, temperature=temp, reduction="none")
    _record(f"GKDTrainer.generalized_jsd_loss[beta={jsd_beta}] * T^2", ours, trl_jsd.sum(-1) * temp**2)
