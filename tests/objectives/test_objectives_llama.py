"""The thin Objective classes on a tiny random Llama: one concatenated forward, references, sums."""

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.objectives.base import ObjectiveOutput, build_objective, get_objective_class
from tunelab.objectives.distill import token_kl
from tunelab.objectives.preference_losses import average_logps, dpo_sigmoid, ipo, kto, kto_kl_estimate, orpo, simpo
from tunelab.objectives.references import (
    AdapterDisabledReference,
    FrozenCopyReference,
    concatenate_pair,
    mismatched_pairs,
    model_sequence_logps,
    pair_logps,
)

V = 128


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


def perturbed(m, seed=1, scale=0.05):
    m2 = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m2


def _side(prompts, responses, width):
    n = len(prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    att = torch.zeros(n, width, dtype=torch.long)
    lab = torch.full((n, width), -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        lab[i, len(p) : len(seq)] = torch.tensor(r)
    return ids, att, lab


def make_batch(seed=0):
    """3 pairs, right-padded, chosen and rejected of different widths (9 and 7)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(3), rnd(2), rnd(4)]
    chosen = [rnd(4), rnd(6), rnd(2)]
    rejected = [rnd(2), rnd(3), rnd(3)]
    c = _side(prompts, chosen, 9)
    r = _side(prompts, rejected, 7)
    keys = ("input_ids", "attention_mask", "labels")
    batch = {f"chosen_{k}": v for k, v in zip(keys, c)} | {f"rejected_{k}": v for k, v in zip(keys, r)}
    return batch


def separate_logps(m, batch):
    """Reference computation: chosen and rejected in two separate forwards, each with its own padding."""
    with torch.no_grad():
        c, nc = model_sequence_logps(m, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                     batch["chosen_labels"])
        r, nr = model_sequence_logps(
            m, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"]
        )
    return c, r, nc, nr


def test_registered():
    for name in ("dpo", "simpo", "orpo", "kto", "distill"):
        cls = get_objective_class(name)
        assert cls.name == name and cls.paper.startswith("https://arxiv.org/abs/")
    assert get_objective_class("dpo").unit == "example" and get_objective_class("distill").unit == "token"
    assert build_objective("orpo", {"lambda": 0.3}).config.lam == 0.3
    assert build_objective("dpo", {"beta": 0.2, "loss_type": "ipo"}).config.loss_type == "ipo"
    with pytest.raises(ValidationError):
        build_objective("dpo", {"betta": 0.2})
    with pytest.raises(ValidationError):
        build_objective("dpo", {"loss_type": "nope"})


def test_concatenated_forward_matches_separate(model):
    batch = make_batch()
    ids, att, lab = concatenate_pair(batch)
    assert ids.shape == (6, 9) and (lab[3:, 7:] == -100).all() and (att[3:, 7:] == 0).all()
    with torch.no_grad():
        pc, pr, nc, nr = pair_logps(model, batch)
    c, r, nc2, nr2 = separate_logps(model, batch)
    assert nc.tolist() == nc2.tolist() == [4, 6, 2] and nr.tolist() == nr2.tolist() == [2, 3, 3]
    torch.testing.assert_close(pc, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(pr, r, atol=1e-5, rtol=0)


def test_dpo_at_init_is_log2(model):
    """Policy == reference: every pair's DPO loss is log 2, IPO's is (1/(2 beta))^2, hinge's is 1."""
    batch = make_batch()
    ref = FrozenCopyReference(copy.deepcopy(model))
    policy = copy.deepcopy(model).train()
    out = build_objective("dpo", {"beta": 0.1}).compute(policy, batch, ref)
    assert isinstance(out, ObjectiveOutput)
    assert int(out.n_units) == 3
    torch.testing.assert_close(out.loss_sum.detach(), torch.tensor(3 * math.log(2.0)), atol=1e-5, rtol=0)
    assert abs(out.metrics["rewards/chosen"].item()) < 1e-5 and abs(out.metrics["rewards/margins"].item()) < 1e-5
    out.loss_sum.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in ref.model.parameters())
    out = build_objective("dpo", {"beta": 0.5, "loss_type": "ipo"}).compute(policy, batch, ref)
    torch.testing.assert_close(out.loss_sum.detach(), torch.tensor(3.0), atol=1e-4, rtol=0)  # 3 * (0 - 1)^2
    out = build_objective("dpo", {"loss_type": "hinge"}).compute(policy, batch, ref)
    torch.testing.assert_close(out.loss_sum.detach(), torch.tensor(3.0), atol=1e-4, rtol=0)


def test_dpo_objective_equals_functions(model):
    batch = make_batch(1)
    policy = perturbed(model)
    ref = FrozenCopyReference(copy.deepcopy(model))
    pc, pr, nc, nr = separate_logps(policy, batch)
    rc, rr, _, _ = separate_logps(model, batch)
    expected = dpo_sigmoid(pc, pr, rc, rr, 0.1, 0.1)
    out = build_objective("dpo", {"beta": 0.1, "label_smoothing": 0.1}).compute(policy, batch, ref)
    torch.testing.assert_close(out.loss_sum.detach(), expected.losses.sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.metrics["rewards/chosen"], expected.chosen_rewards.sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.metrics["logps/rejected"], pr.sum(), atol=1e-4, rtol=0)
    # precomputed reference log-probs in the batch are used instead of a reference model
    pre = batch | {"ref_chosen_logps": rc, "ref_rejected_logps": rr}
    out2 = build_objective("dpo", {"beta": 0.1, "label_smoothing": 0.1}).compute(policy, pre, None)
    torch.testing.assert_close(out2.loss_sum.detach(), expected.losses.sum(), atol=1e-5, rtol=0)
    exp_ipo = ipo(pc, pr, rc, rr, 0.3, nc, nr).losses.sum()
    out3 = build_objective("dpo", {"beta": 0.3, "loss_type": "ipo"}).compute(policy, batch, ref)
    torch.testing.assert_close(out3.loss_sum.detach(), exp_ipo, atol=1e-4, rtol=1e-5)
    # no reference and not a PEFT model: a clear error
    with pytest.raises(ValueError, match="reference"):
        build_objective("dpo", {}).compute(policy, batch, None)


def test_adapter_disabled_reference(model):
    from peft import LoraConfig, get_peft_model

    base_copy = copy.deepcopy(model)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.train()
    batch = make_batch(2)
    base_c, base_r, _, _ = separate_logps(base_copy, batch)
    pol_c, pol_r, _, _ = separate_logps(peft_model, batch)
    assert (pol_c - base_c).abs().max() > 1e-3  # the adapter changes the model
    ref = AdapterDisabledReference(peft_model)
    rc, rr = ref.logps(batch)
    torch.testing.assert_close(rc, base_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(rr, base_r, atol=1e-5, rtol=0)
    assert not rc.requires_grad
    assert peft_model.training and all(m.training for m in peft_model.modules())  # flags restored
    pol_c2, _, _, _ = separate_logps(peft_model, batch)
    torch.testing.assert_close(pol_c2, pol_c, atol=0, rtol=0)  # adapter re-enabled afterwards
    # DPO with ref=None on a PEFT model uses the adapter-disabled reference
    out = build_objective("dpo", {"beta": 0.1}).compute(peft_model, batch, None)
    expected = dpo_sigmoid(pol_c, pol_r, base_c, base_r, 0.1).losses.sum()
    torch.testing.assert_close(out.loss_sum.detach(), expected, atol=1e-5, rtol=0)
    out.loss_sum.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())


def test_simpo_orpo_objectives_equal_functions(model):
    batch = make_batch(3)
    pc, pr, nc, nr = separate_logps(model, batch)
    ca, ra = average_logps(pc, nc), average_logps(pr, nr)
    out = build_objective("simpo", {"beta": 2.0, "gamma": 0.7}).compute(model, batch, None)
    torch.testing.assert_close(out.loss_sum.detach(), simpo(ca, ra, 2.0, 0.7).losses.sum(), atol=1e-5, rtol=0)
    assert int(out.n_units) == 3
    out = build_objective("orpo", {"lambda": 0.2}).compute(model, batch, None)
    expected = (-ca + orpo(ca, ra, 0.2).losses).sum()  # NLL (mean over the chosen response) + OR term
    torch.testing.assert_close(out.loss_sum.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.metrics["nll"], -ca.sum(), atol=1e-5, rtol=0)


def test_mismatched_pairs():
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    att = (ids != 0).long()
    lab = torch.tensor([[-100, -100, 3, 4, -100], [-100, 6, 7, 8, 9], [-100, -100, 12, -100, -100]])
    k_ids, k_att, k_lab = mismatched_pairs(ids, att, lab)
    # row i = prompt of i + completion of i+1
    assert k_ids.tolist() == [[1, 2, 6, 7, 8, 9], [5, 12, 0, 0, 0, 0], [10, 11, 3, 4, 0, 0]]
    assert k_att.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert k_lab.tolist() == [[-100, -100, 6, 7, 8, 9], [-100, 12, -100, -100, -100, -100],
                              [-100, -100, 3, 4, -100, -100]]


def test_kto_objective(model):
    batch = make_batch(4)
    ref = FrozenCopyReference(copy.deepcopy(model))
    # at init: r = 0 and z0 = 0 -> every example's loss is w * (1 - sigmoid(0)) = w / 2
    out = build_objective("kto", {"beta": 0.1, "undesirable_weight": 2.0}).compute(copy.deepcopy(model), batch, ref)
    assert int(out.n_units) == 6
    torch.testing.assert_close(out.loss_sum.detach(), torch.tensor(3 * 0.5 + 3 * 1.0), atol=1e-5, rtol=0)
    # perturbed policy: equals the function on separately computed log-probs and mismatched pairs
    policy = perturbed(model, seed=5)
    ids, att, lab = concatenate_pair(batch)
    with torch.no_grad():
        pol, _ = model_sequence_logps(policy, ids, att, lab)
        refl, _ = model_sequence_logps(model, ids, att, lab)
        kl_ids, kl_att, kl_lab = mismatched_pairs(ids, att, lab)
        z0 = kto_kl_estimate(model_sequence_logps(policy, kl_ids, kl_att, kl_lab)[0],
                             model_sequence_logps(model, kl_ids, kl_att, kl_lab)[0])
    desirable = torch.tensor([True] * 3 + [False] * 3)
    expected = kto(pol, refl, desirable, z0, 0.1, 1.0, 2.0)
    out = build_objective("kto", {"beta": 0.1, "undesirable_weight": 2.0}).compute(policy, batch, ref)
    torch.testing.assert_close(out.loss_sum.detach(), expected.losses.sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.metrics["kl"] / 6, z0, atol=1e-5, rtol=0)
    # unpaired batch format gives the same result
    unpaired = {"input_ids": ids, "attention_mask": att, "labels": lab, "desirable": desirable}
    out2 = build_objective("kto", {"beta": 0.1, "undesirable_weight": 2.0}).compute(policy, unpaired, ref)
    torch.testing.assert_close(out2.loss_sum.detach(), expected.losses.sum(), atol=1e-5, rtol=0)


def _pairs_subset(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def test_kto_refuses_a_kl_estimate_from_matched_prompts(model):
    """One preference pair per micro-batch: its chosen and rejected rows share their prompt, so the old
    mismatched pairs (x, y_rejected), (x, y_chosen) made z0 the mean implied reward of matched completions,
    not a KL estimate. TRL refuses per-device batch size 1 (KTOTrainer: 'Actual (not effective) batch size
    must be > 1'); so does tunelab, for pairs and for one unpaired example."""
    batch, ref = make_batch(4), FrozenCopyReference(copy.deepcopy(model))
    kto_obj = build_objective("kto", {})
    with pytest.raises(ValueError, match="batch_size >= 2"):
        kto_obj.compute(perturbed(model, seed=5), _pairs_subset(batch, [0]), ref)
    ids, att, lab = concatenate_pair(_pairs_subset(batch, [0]))
    one = {"input_ids": ids[:1], "attention_mask": att[:1], "labels": lab[:1], "desirable": torch.tensor([True])}
    with pytest.raises(ValueError, match="batch_size >= 2"):
        kto_obj.compute(perturbed(model, seed=5), one, ref)


def test_kto_kl_estimate_uses_only_pairs_with_different_prompts(model):
    """Pairs 0 and 1 of this batch have the same prompt: the KL rows that pair prompt 0 with pair 1's
    completions are left out, z0 is the mean over the other rows (by hand)."""
    batch = _pairs_subset(make_batch(4), [0, 0, 2])  # rows 0 and 1 are the same pair
    ref = FrozenCopyReference(copy.deepcopy(model))
    policy = perturbed(model, seed=3)
    ids, att, lab = concatenate_pair(batch)  # [c0, c0, c2, r0, r0, r2]
    kl_ids, kl_att, kl_lab = mismatched_pairs(ids, att, lab)  # row i: prompt i + completion i+1
    keep = torch.tensor([False, True, True, False, True, True])  # 0->1 and 3->4 pair prompt 0 with prompt 0
    with torch.no_grad():
        pol = model_sequence_logps(policy, kl_ids, kl_att, kl_lab)[0]
        refl = model_sequence_logps(model, kl_ids, kl_att, kl_lab)[0]
    out = build_objective("kto", {}).compute(policy, batch, ref)
    z0 = kto_kl_estimate(pol[keep], refl[keep])
    assert z0 > 0 and abs(z0 - kto_kl_estimate(pol, refl)) > 1e-4  # the old estimate (every row) differs
    torch.testing.assert_close(out.metrics["kl"] / 6, z0, atol=1e-6, rtol=0)


def test_distill_objective(model):
    batch = make_batch(5)
    sft = {"input_ids": batch["chosen_input_ids"], "attention_mask": batch["chosen_attention_mask"],
           "labels": batch["chosen_labels"]}
    student = perturbed(model, seed=7)
    # teacher == student: zero KL
    out = build_objective("distill", {}, teacher=copy.deepcopy(student)).compute(student, sft, None)
    assert int(out.n_units) == 12 and abs(out.loss_sum.item()) < 1e-6
    # teacher from a FrozenCopyReference; reverse KL at T = 2 plus CE
    opts = {"temperature": 2.0, "direction": "reverse", "ce_weight": 0.5}
    out = build_objective("distill", opts).compute(student, sft, FrozenCopyReference(copy.deepcopy(model)))
    with torch.no_grad():
        s = student(input_ids=sft["input_ids"], attention_mask=sft["attention_mask"]).logits
        t = model(input_ids=sft["input_ids"], attention_mask=sft["attention_mask"]).logits
    mask = sft["labels"][:, 1:] != -100
    kl = token_kl(s[:, :-1], t[:, :-1], mask, 2.0, "reverse")
    ce = torch.nn.functional.cross_entropy(s[:, :-1][mask], sft["labels"][:, 1:][mask], reduction="sum")
    torch.testing.assert_close(out.loss_sum.detach(), kl.sum() + 0.5 * ce, atol=1e-4, rtol=1e-5)
    assert out.loss_sum.requires_grad
    with pytest.raises(ValueError, match="teacher"):
        build_objective("distill", {}).compute(student, sft, None)
