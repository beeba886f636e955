"""SFT variants (DFT, ASFT, NEFTune, Masked Thought, token weights) on a tiny Llama: exact values, then the loop."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_recipe_dict
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.objectives.base import build_objective, get_objective_class
from tunelab.objectives.distill import token_kl
from tunelab.objectives.references import FrozenCopyReference
from tunelab.objectives.sft_variants import dft_token_weights

V = 96


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg)


def make_batch(seed=0):
    """3 rows right-padded to 10: prompt (no target), response (targets), padding (label -100, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [10, 8, 6], [4, 3, 2]
    ids = torch.randint(2, V, (3, 10), generator=g)
    att = torch.zeros(3, 10, dtype=torch.long)
    lab = torch.full((3, 10), -100)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        att[i, :n] = 1
        lab[i, p:n] = ids[i, p:n]
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def ce_by_hand(logits, labels):
    """[B, T-1] CE of logits[:, :-1] against labels[:, 1:], 0 where ignored (fp32)."""
    lg, tg = logits[:, :-1].float(), labels[:, 1:]
    m = tg != -100
    logp = F.log_softmax(lg, -1).gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (-logp) * m, m


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_presets_registered_with_papers_and_defaults():
    expect = {"dft": "2508.05629", "asft": "2509.23753", "neftune": "2310.05914", "masked_thought": "2403.02178"}
    for name, arxiv in expect.items():
        assert arxiv in get_objective_class(name).paper
    assert build_objective("asft", {}).config.dft and build_objective("asft", {}).config.kl_coef == 0.1
    assert build_objective("neftune", {}).config.neftune_alpha == 5.0
    assert build_objective("masked_thought", {}).config.masked_thought_p == 0.4
    assert build_objective("sft", {"dft": True, "neftune_alpha": 5}).config.dft  # options compose on `sft`
    with pytest.raises(Exception, match="extra"):
        build_objective("sft", {"neftune": 5})


def test_plain_sft_unchanged_and_token_weights_align():
    model = tiny_llama().eval()
    batch = make_batch()
    out = build_objective("sft", {}).compute(model, batch)
    ce, m = ce_by_hand(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["labels"])
    torch.testing.assert_close(out.loss_sum, ce.sum(), atol=1e-5, rtol=0)
    assert out.metrics == {} and int(out.n_units) == int(m.sum()) == 6 + 5 + 4
    # per-token weights: weight[t] multiplies the CE of the label AT t (i.e. ce[:, t-1])
    w = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(1))
    wb = {**batch, "loss_weights": w}
    out_w = build_objective("weighted_sft", {}).compute(model, wb)
    torch.testing.assert_close(out_w.loss_sum, (w[:, 1:] * ce).sum(), atol=1e-5, rtol=0)
    wrong = (w[:, :-1] * ce).sum()  # the off-by-one alignment a wrong implementation would use
    assert abs(float(out_w.loss_sum.detach() - wrong)) > 1e-3
    assert int(out_w.n_units) == int(m.sum())  # the unit stays the target token (normalised by the loop)
    torch.testing.assert_close(out_w.metrics["ce"], ce.sum(), atol=1e-5, rtol=0)
    # `sft` applies weights the batch carries (auto), `ignore` does not, `weighted_sft` demands them
    torch.testing.assert_close(build_objective("sft", {}).compute(model, wb).loss_sum, out_w.loss_sum)
    torch.testing.assert_close(build_objective("sft", {"loss_weights": "ignore"}).compute(model, wb).loss_sum,
                               out.loss_sum)
    with pytest.raises(ValueError, match="loss_weights"):
        build_objective("weighted_sft", {}).compute(model, batch)
    with pytest.raises(ValueError, match="differ"):
        build_objective("sft", {}).compute(model, {**batch, "loss_weights": w[:, :-1]})


def test_zero_weight_rows_get_no_gradient():
    model = tiny_llama()
    batch = make_batch()
    w = torch.zeros(3, 10)
    w[0] = 1.0  # only row 0 counts
    build_objective("sft", {}).compute(model, {**batch, "loss_weights": w}).loss_sum.backward()
    g_weighted = grads(model)
    model.zero_grad()
    row0 = {k: v[:1] for k, v in batch.items()}
    build_objective("sft", {}).compute(model, row0).loss_sum.backward()
    for n, g in grads(model).items():
        torch.testing.assert_close(g_weighted[n], g, atol=1e-6, rtol=1e-4)


def test_dft_value_and_stop_gradient():
    model = tiny_llama()
    batch = make_batch(1)
    out = build_objective("dft", {}).compute(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, m = ce_by_hand(logits, batch["labels"])
    p = dft_token_weights(logits, batch["labels"])  # the colleague's pure function as the reference
    torch.testing.assert_close(out.loss_sum, (p * ce).sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.metrics["dft_weight"], p.sum(), atol=1e-6, rtol=1e-5)
    out.loss_sum.backward()
    g_obj = grads(model)
    # the gradient is sum_t sg(p_t) grad CE_t: equal to the detached form, not to grad of p*CE
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, _ = ce_by_hand(logits, batch["labels"])
    (torch.exp(-ce).detach() * m * ce).sum().backward()
    g_detached = grads(model)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, _ = ce_by_hand(logits, batch["labels"])
    (torch.exp(-ce) * m * ce).sum().backward()
    g_through = grads(model)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(g_obj[name], g_detached[name], atol=1e-7, rtol=1e-4)
    assert (g_obj[name] - g_through[name]).abs().max() > 1e-4 * g_obj[name].abs().max()


def _lora(model, init=True):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=init))


def test_asft_kl_anchor_adapter_reference_equals_frozen_copy():
    base = tiny_llama()
    base_copy = copy.deepcopy(base)
    batch = make_batch(2)
    peft_model = _lora(copy.deepcopy(base)).eval()
    # at init (B = 0) the policy is its reference: KL = 0 and ASFT equals DFT
    out0 = build_objective("asft", {}).compute(peft_model, batch)
    assert float(out0.metrics["kl"]) < 1e-9
    torch.testing.assert_close(out0.loss_sum, build_objective("dft", {}).compute(peft_model, batch).loss_sum)
    # a trained adapter: the KL term is kl_coef * sum_t KL(p_ref || p_policy) over the targets
    peft_model = _lora(copy.deepcopy(base), init=False).eval()
    out = build_objective("asft", {"kl_coef": 0.5}).compute(peft_model, batch)  # ref: adapter disabled
    pol = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    refl = base_copy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    kl = token_kl(pol[:, :-1], refl[:, :-1], mask, direction="forward")
    assert float(kl.sum()) > 1e-4
    torch.testing.assert_close(out.metrics["kl"], kl.sum().detach(), atol=1e-6, rtol=1e-5)
    dft = build_objective("dft", {}).compute(peft_model, batch).loss_sum
    torch.testing.assert_close(out.loss_sum, dft + 0.5 * kl.sum(), atol=1e-6, rtol=1e-5)
    # an explicit frozen copy as the reference gives the same loss
    out_copy = build_objective("asft", {"kl_coef": 0.5}).compute(peft_model, batch, FrozenCopyReference(base_copy))
    assert abs(float(out_copy.loss_sum - out.loss_sum)) < 1e-6
    # reverse direction is KL(p_policy || p_ref)
    out_rev = build_objective("asft", {"kl_coef": 0.5, "kl_direction": "reverse"}).compute(peft_model, batch)
    torch.testing.assert_close(out_rev.metrics["kl"], token_kl(pol[:, :-1], refl[:, :-1], mask, direction="reverse")
                               .sum().detach(), atol=1e-6, rtol=1e-5)
    # no adapter and no ref: a clear error
    with pytest.raises(ValueError, match="reference"):
        build_objective("asft", {}).compute(tiny_llama(), batch)


def test_neftune_noise_only_in_training_and_hook_removed():
    model = tiny_llama()
    batch = make_batch(3)
    emb = model.get_input_embeddings()
    seen = []
    layer0 = model.model.layers[0]

    def capture(mod, args, kwargs):  # what the first decoder layer receives: the (noisy) embeddings
        seen.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    handle = layer0.register_forward_pre_hook(capture, with_kwargs=True)
    alpha = 5.0
    obj = build_objective("neftune", {"neftune_alpha": alpha})
    model.train()
    torch.manual_seed(0)
    out_train = obj.compute(model, batch)
    assert len(emb._forward_hooks) == 0  # installed for the forward only
    clean = emb(batch["input_ids"])
    noise = seen[-1] - clean  # [B, T, d]
    d = clean.size(-1)
    lengths = batch["attention_mask"].sum(1)
    for i in range(3):
        bound = alpha / math.sqrt(int(lengths[i]) * d)
        n = int(lengths[i])
        assert noise[i, :n].abs().max() <= bound * (1 + 1e-5)
        assert noise[i, :n].abs().max() > 0.5 * bound  # uniform on [-bound, bound]: the max is near it
        assert torch.all(noise[i, n:] == 0)  # padding gets no noise
    model.eval()  # evaluation: no noise, the plain SFT loss
    out_eval = obj.compute(model, batch)
    plain = build_objective("sft", {"chunk_size": 0}).compute(model, batch)  # same full-logits path
    torch.testing.assert_close(out_eval.loss_sum, plain.loss_sum, atol=1e-6, rtol=0)
    assert abs(float(out_train.loss_sum - plain.loss_sum)) > 1e-6
    handle.remove()


def test_masked_thought_corrupts_response_inputs_only():
    model = tiny_llama()
    batch = make_batch(4)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    model.train()
    out = build_objective("masked_thought", {"masked_thought_p": 1.0, "mask_token_id": 7}).compute(model, batch)
    ids_in = seen[-1]
    response = batch["labels"] != -100
    assert torch.equal(ids_in[response], torch.full_like(ids_in[response], 7))
    assert torch.equal(ids_in[~response], batch["input_ids"][~response])  # prompt and padding untouched
    # targets are still the original tokens: the loss equals CE of the clean labels on the masked input
    masked = {**batch, "input_ids": ids_in}
    torch.testing.assert_close(out.loss_sum, build_objective("sft", {}).compute(model, masked).loss_sum,
                               atol=1e-6, rtol=0)
    # default mask token: the model's pad id; p = 0.4 masks about 40% of response tokens
    big = {k: v.repeat(40, 1) for k, v in batch.items()}
    build_objective("masked_thought", {}).compute(model, big)
    frac = (seen[-1][big["labels"] != -100] == 0).float().mean()
    assert 0.3 < float(frac) < 0.5
    model.eval()
    build_objective("masked_thought", {}).compute(model, batch)
    assert torch.equal(seen[-1], batch["input_ids"])  # evaluation sees the clean input


@pytest.mark.slow
@pytest.mark.parametrize("objective", [
    {"name": "dft"},
    {"name": "asft"},
    {"name": "neftune", "neftune_alpha": 0.5},  # the tiny model's embeddings are ~0.02: alpha 5 would drown them
    {"name": "masked_thought", "masked_thought_p": 0.2},
    {"name": "weighted_sft"},
])
def test_variant_trains_in_the_loop_and_ce_falls(objective, tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.recipe import Recipe
    from tunelab.runner import open_workspace, train_workspace

    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective=objective,
                         train={"max_steps": 8, "lr": 1e-2}, data={"train": {"builtin": "date_format", "n": 32},
                                                                     "eval": None})
    ws = open_workspace(Recipe.model_validate(d))
    if objective["name"] == "weighted_sft":  # weights on the encoded examples, as a data selector sets them
        for e in ws.train_data:  # weight 2 on the first half of each target span, 0.5 on the rest
            tgt = [i for i, lab in enumerate(e["labels"]) if lab != -100]
            e["loss_weights"] = [0.0] * len(e["labels"])
            for k, i in enumerate(tgt):
                e["loss_weights"][i] = 2.0 if k < len(tgt) // 2 else 0.5
    _, result, _ = train_workspace(ws)
    lines = [json.loads(x) for x in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]
    ce = [x["ce"] for x in lines]
    assert len(ce) == 8 and all(math.isfinite(x["loss"]) for x in lines)
    # the cross-entropy of the targets falls. (Without DFT's stop-gradient, the gradient of p * CE is
    # p (1 - CE) grad CE, which pushes CE UP wherever CE > 1: the DFT cases would fail.)
    # (From ln V ~ 6.2 the tiny model first learns the unigram statistics: ~0.2 nats in 8 LoRA steps.)
    assert sum(ce[-3:]) / 3 < sum(ce[:3]) / 3 - 0.1
    if objective["name"] in ("dft", "asft"):
        assert "dft_weight" in lines[0] and 0 < lines[0]["dft_weight"] < 1
    if objective["name"] == "asft":
        assert lines[0]["kl"] < 1e-6 < lines[-1]["kl"]  # policy starts at its reference, then drifts


def test_weights_column_and_prompt_loss_weight_through_the_runner(tiny_model_dir, tmp_path):
    """The data's `loss_weights` column and `data.prompt_loss_weight` reach the objective through the runner's
    collator; held-out data stays unweighted (plain response cross-entropy)."""
    from tunelab.data.encode import IGNORE_INDEX
    from tunelab.recipe import Recipe
    from tunelab.runner import evaluate, open_workspace, train_workspace

    rows = [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i), "loss_weights": 0.5 + i % 2}
            for i in range(8)]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", objective={"name": "weighted_sft"},
                         data={"train": {"path": str(path)}, "eval": {"path": str(path)}},
                         train={"max_steps": 2, "batch_size": 4})
    ws = open_workspace(Recipe.model_validate(d))
    assert {tuple(set(w for w, lab in zip(e["loss_weights"][1:], e["labels"][1:]) if lab != IGNORE_INDEX))
            for e in ws.train_data} == {(0.5,), (1.5,)}
    _, result, _ = train_workspace(ws)
    assert math.isfinite(result.final_loss)

    d["data"]["prompt_loss_weight"] = 0.1
    d["objective"] = {"name": "sft"}
    ws = open_workspace(Recipe.model_validate(d))
    e = ws.train_data[0]
    assert e["loss_weights"].count(0.1) > 0  # the user turn's tokens carry loss, with the prompt weight
    assert (sum(lab != IGNORE_INDEX for lab in e["labels"])
            > sum(lab != IGNORE_INDEX for lab in ws.eval_data[0]["labels"]))
    assert "loss_weights" in e and "loss_weights" in ws.eval_data[0]  # the column itself is kept in eval data
    model, _, _ = train_workspace(ws)
    out = evaluate(ws, model, "after")
    assert math.isfinite(out["eval_loss"]) and abs(out["perplexity"] - math.exp(out["eval_loss"])) < 1e-6
