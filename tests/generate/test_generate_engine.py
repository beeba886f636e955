"""The generation engine against transformers' generate, on a tiny random Llama whose weights are drawn wide
enough (initializer_range 0.3) that greedy continuations vary from prompt to prompt and step to step."""

from __future__ import annotations

import pytest
import torch
from tiny import build_tiny_model

from tunelab.generate import GenerateConfig, encode_prompts, generate, plan_batches
from tunelab.generate.batching import left_pad

MAX_NEW = 12


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer), seed=1, initializer_range=0.3).eval()


def chat(i: int) -> list[dict[str, str]]:
    # lengths vary (1-3 repeats), so batches are left-padded
    return [{"role": "user", "content": f"What is {i} + {3 * i}? Reply with the number only. " * (1 + i % 3)}]


PROMPTS = [chat(i) for i in range(11)]


def hf_greedy(model, tok, prompts, batch_size, max_new, stop_ids) -> list[list[int]]:
    """transformers' generate on the engine's batches; each row cut after its first stop id."""
    enc = encode_prompts(tok, prompts)
    out: list[list[int]] = [[] for _ in enc]
    for idx in plan_batches([len(e) for e in enc], batch_size):
        ids, mask, _ = left_pad([enc[i] for i in idx], tok.pad_token_id)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=tok.pad_token_id)
        for r, i in enumerate(idx):
            row = seq[r, ids.shape[1]:].tolist()
            end = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
            out[i] = row[:end]
    return out


def frequent_tokens(model, tok) -> tuple[int, int]:
    """Two token ids the model generates early in some rows and never in others: stops that end rows apart."""
    runs = generate(model, tok, PROMPTS, GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32", stop_token_ids=()))
    counts: dict[int, int] = {}
    for c in runs.completions:
        for t in set(c.token_ids[2:8]):
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted(counts, key=lambda t: -counts[t])
    return ranked[0], ranked[1]


@pytest.mark.parametrize("batch_size", [4, 16])
def test_greedy_equals_transformers_generate(model, tiny_tokenizer, batch_size):
    """Token for token, with padding, several batches, and rows stopping at different steps."""
    stops = frequent_tokens(model, tiny_tokenizer)
    cfg = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=batch_size, precision="fp32", stop_token_ids=stops)
    out = generate(model, tiny_tokenizer, PROMPTS, cfg)
    ref = hf_greedy(model, tiny_tokenizer, PROMPTS, batch_size, MAX_NEW, stops)
    assert [c.token_ids for c in out.completions] == ref
    lengths = {len(r) for r in ref}
    assert len(lengths) > 2 and max(lengths) == MAX_NEW and min(lengths) < MAX_NEW  # the case is not trivial
    for c, r in zip(out.completions, ref):
        assert c.finish_reason == ("stop" if r[-1] in stops else "length")
        assert c.text == tiny_tokenizer.decode(r, skip_special_tokens=True)


def test_greedy_bf16_equals_transformers_on_bf16_weights(model, tiny_tokenizer):
    """precision bf16 casts the fp32 weights for the call: the same tokens as generate on a bf16 copy; the
    model's own weights come back bit for bit, and its training flag too."""
    import copy

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = generate(model, tiny_tokenizer, PROMPTS, GenerateConfig(max_new_tokens=MAX_NEW, precision="bf16"))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    model.eval()
    bf16 = copy.deepcopy(model)
    for p in bf16.parameters():
        p.data = p.data.to(torch.bfloat16)
    ref = hf_greedy(bf16, tiny_tokenizer, PROMPTS, 32, MAX_NEW, (tiny_tokenizer.eos_token_id,))
    assert [c.token_ids for c in out.completions] == ref


def test_drop_finished_rows_keeps_the_outputs(model, tiny_tokenizer):
    """Finished rows compacted out of the batch: in fp32 on this model the tokens do not change."""
    stops = frequent_tokens(model, tiny_tokenizer)
    base = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=16, precision="fp32", stop_token_ids=stops)
    keep = generate(model, tiny_tokenizer, PROMPTS, base)
    drop = generate(model, tiny_tokenizer, PROMPTS,
                    GenerateConfig(**{**base.__dict__, "drop_finished": True}))
    assert [c.token_ids for c in drop.completions] == [c.token_ids for c in keep.completions]
    assert [c.finish_reason for c in drop.completions] == [c.finish_reason for c in keep.completions]


def test_stop_strings_cut_the_text_and_end_the_row(model, tiny_tokenizer):
    free = generate(model, tiny_tokenizer, PROMPTS[:1], GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32",
                                                                       stop_token_ids=()))
    ids = free.completions[0].token_ids
    full = tiny_tokenizer.decode(ids)
    stop = tiny_tokenizer.decode(ids[4:6]).strip()  # a string that first appears at tokens 4-5
    assert stop and full.find(stop) >= len(tiny_tokenizer.decode(ids[:4]).rstrip()) - 1
    out = generate(model, tiny_tokenizer, PROMPTS[:1], GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32",
                                                                      stop_token_ids=(), stop_strings=(stop,)))
    c = out.completions[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == ids[: len(c.token_ids)] and len(c.token_ids) <= 6
    assert stop in tiny_tokenizer.decode(c.token_ids) and stop not in tiny_tokenizer.decode(c.token_ids[:-1])
    assert c.text == full[: full.find(stop)]


def test_logprobs_equal_a_teacher_forced_forward(model, tiny_tokenizer):
    """The returned log-probs are what the training forward computes for the same tokens: log softmax(z / T)."""
    cfg = GenerateConfig(max_new_tokens=8, precision="fp32", do_sample=True, temperature=0.7, top_p=0.9, seed=3,
                         return_logprobs=True, stop_token_ids=())
    out = generate(model, tiny_tokenizer, PROMPTS[:3], cfg)
    for prompt, c in zip(encode_prompts(tiny_tokenizer, PROMPTS[:3]), out.completions):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1: -1].float() / cfg.temperature
        ref = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_sampling_is_reproducible_and_independent_of_batching(model, tiny_tokenizer):
    def run(**kw):
        cfg = GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32", do_sample=True, top_p=0.95, top_k=50, **kw)
        return [c.token_ids for c in generate(model, tiny_tokenizer, PROMPTS, cfg).completions]

    a = run(seed=7, batch_size=16)
    assert a == run(seed=7, batch_size=16)
    assert a == run(seed=7, batch_size=3)  # per-sequence random streams: the batch does not matter
    assert a != run(seed=8, batch_size=16)
    greedy = generate(model, tiny_tokenizer, PROMPTS, GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32"))
    assert a != [c.token_ids for c in greedy.completions]


def test_first_sequence_makes_slices_of_a_batch_sample_what_the_whole_batch_samples(model, tiny_tokenizer):
    """Processes that each sample their slice of one global batch (RL rollouts) draw what one process would."""
    def run(prompts, **kw):
        cfg = GenerateConfig(max_new_tokens=MAX_NEW, precision="fp32", do_sample=True, seed=3,
                             num_return_sequences=2, **kw)
        return [c.token_ids for c in generate(model, tiny_tokenizer, prompts, cfg).completions]

    whole = run(PROMPTS[:4])
    assert run(PROMPTS[:2]) + run(PROMPTS[2:4], first_sequence=4) == whole
    assert run(PROMPTS[2:4]) != whole[4:]  # without the offset the slice reuses the first rows' streams


def test_num_return_sequences_prefills_each_prompt_once(model, tiny_tokenizer):
    widths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: widths.append(tuple(a[0].shape)))
    try:
        cfg = GenerateConfig(max_new_tokens=6, precision="fp32", do_sample=True, seed=0, num_return_sequences=4,
                             batch_size=8, stop_token_ids=())
        out = generate(model, tiny_tokenizer, PROMPTS[:4], cfg)
    finally:
        hook.remove()
    prefills = [w for w in widths if w[1] > 1]
    assert [w[0] for w in prefills] == [2, 2]  # 2 prompts per batch of 8 rows, each prefilled once
    assert [c.prompt_index for c in out.completions] == [i for i in range(4) for _ in range(4)]
    samples = [tuple(c.token_ids) for c in out.completions[:4]]
    assert len(set(samples)) > 1  # the prompt's completions are sampled independently
    # the shared prefill is the prompt's own: greedy with 2 copies equals greedy alone
    one = generate(model, tiny_tokenizer, PROMPTS[:4], GenerateConfig(max_new_tokens=6, precision="fp32"))
    two = generate(model, tiny_tokenizer, PROMPTS[:4], GenerateConfig(max_new_tokens=6, precision="fp32",
                                                                      num_return_sequences=2))
    assert [c.token_ids for c in two.completions] == [c.token_ids for c in one.completions for _ in range(2)]


def test_prefill_logits_come_from_a_contiguous_last_position(model, tiny_tokenizer):
    """The known generation-memory issue: a strided [B, 1, d] input to a frozen bf16 lm_head on CPU is computed
    against the weight expanded to [B, d, vocab] (1.8 GB for SmolLM2 at batch 32). The engine's is contiguous."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: seen.append((a[0].shape, a[0].is_contiguous())))
    try:
        generate(model, tiny_tokenizer, PROMPTS[:6], GenerateConfig(max_new_tokens=2, precision="bf16"))
    finally:
        hook.remove()
    assert seen and all(contiguous and shape[1] == 1 for shape, contiguous in seen)


def test_lora_and_prompt_tuning_models_generate(tiny_model_dir, tiny_tokenizer):
    """PEFT adapters: LoRA through the engine (its weights restored after the bf16 call); prompt tuning through
    PEFT's own generate (fallback.py), with the same outputs' shape."""
    from tunelab.methods.registry import build_method
    from tunelab.model import load_model
    from tunelab.recipe import ModelConfig

    for name, options in (("lora", {"r": 4, "alpha": 8}), ("prompt_tuning", {"num_virtual_tokens": 3})):
        model = build_method(name, options).prepare(load_model(ModelConfig(name_or_path=str(tiny_model_dir))))
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out = generate(model, tiny_tokenizer, PROMPTS[:5], GenerateConfig(max_new_tokens=4, batch_size=2,
                                                                          return_logprobs=True))
        assert len(out.completions) == 5 and all(1 <= len(c.token_ids) <= 4 for c in out.completions)
        assert all(len(c.logprobs) == len(c.token_ids) for c in out.completions)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32 and torch.equal(p, trainable[n]), n


@pytest.mark.parametrize("method,options", [("loreft", {}), ("vera", {"r": 4})])
def test_bf16_generation_of_adapters_with_parametrized_weights_or_buffers(tiny_tokenizer, method, options):
    """LoReFT's orthogonal rotation is a parametrization whose `original` goes through torch.linalg.solve (no bf16
    kernel on CPU), VeRA's shared projections are PEFT buffers: a bf16 call keeps the first in fp32 under
    autocast and casts the second with the weights they multiply; everything comes back as it was."""
    from tunelab.methods.registry import build_method

    model = build_method(method, options).prepare(build_tiny_model(len(tiny_tokenizer)))
    before = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    out = generate(model, tiny_tokenizer, PROMPTS[:3], GenerateConfig(max_new_tokens=4, precision="bf16"))
    assert len(out.completions) == 3 and all(c.token_ids for c in out.completions)
    after = model.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
