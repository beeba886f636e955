"""The lean Llama-family decoding step (tunelab.generate.llama) against the model's own forward: the same logits
bit for bit at every step, and the same greedy tokens as transformers' generate, for tiny llama, mistral and qwen2
models (random weights drawn wide, initializer_range 0.3, so greedy continuations vary); other models fall back
to the forward."""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab.generate import GenerateConfig, encode_prompts, generate, plan_batches
from tunelab.generate.batching import left_pad
from tunelab.generate.cache import make_cache
from tunelab.generate.forward import ModelStep, _ForwardDecoder
from tunelab.generate.llama import LlamaDecoder

MAX_NEW = 10
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
             initializer_range=0.3)


def build(family: str, vocab: int, **overrides):
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{prefix}Config")(**{**SIZES, "vocab_size": vocab, **overrides})
    torch.manual_seed(5)
    return getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()


def prompts(n: int = 9) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Add {i} and {7 * i}, then say why. " * (1 + i % 3)}] for i in range(n)]


def step_logits(model, tok, decoder: str, dtype, steps: int = 6, padded: bool = True) -> list[torch.Tensor]:
    """Prefill one batch, then decode `steps` greedy tokens through `decoder` ("lean" | "forward"). Left-padded,
    or (padded=False) the prompts of the most common length only, without a mask, as the engine runs them."""
    model = copy.deepcopy(model).to(dtype)
    enc = encode_prompts(tok, prompts(9 if padded else 40))
    if not padded:
        common = max({len(e) for e in enc}, key=lambda n: sum(len(e) == n for e in enc))
        enc = [e for e in enc if len(e) == common]
    ids, mask, positions = left_pad(enc, tok.pad_token_id)
    assert bool(mask.all()) != padded
    capacity = ids.shape[1] + steps
    full = None
    if padded:
        full = torch.ones(len(enc), capacity, dtype=torch.long)
        full[:, : ids.shape[1]] = mask
    out = []
    with torch.inference_mode():
        step = ModelStep(model)
        cache = make_cache(step.config, capacity)
        logits = step.prefill(ids, full[:, : ids.shape[1]] if padded else None, positions, cache)
        dec = (LlamaDecoder.build(model, cache, full, capacity, dtype) if decoder == "lean"
               else _ForwardDecoder(step, cache, full))
        assert dec is not None
        last = positions[:, -1].clone()
        for _ in range(steps):
            last = last + 1
            logits = dec.step(logits.argmax(-1).view(-1, 1), last.view(-1, 1))
            out.append(logits)
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [True, False])
def test_lean_step_logits_equal_the_forward_bit_for_bit(tiny_tokenizer, family, dtype, padded):
    """Padded batches (pack_gqa's layout and the mask) and unpadded ones (no mask: grouped-query SDPA)."""
    model = build(family, len(tiny_tokenizer))
    lean = step_logits(model, tiny_tokenizer, "lean", dtype, padded=padded)
    ref = step_logits(model, tiny_tokenizer, "forward", dtype, padded=padded)
    assert all(torch.equal(a, b) for a, b in zip(lean, ref))
    assert len({int(t) for r in ref for t in r.argmax(-1)}) > 3  # tokens vary: the steps are not trivial


def hf_greedy(model, tok, batch_size: int) -> list[list[int]]:
    enc = encode_prompts(tok, prompts())
    out: list[list[int]] = [[] for _ in enc]
    for idx in plan_batches([len(e) for e in enc], batch_size):
        ids, mask, _ = left_pad([enc[i] for i in idx], tok.pad_token_id)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=[], pad_token_id=tok.pad_token_id)
        for r, i in enumerate(idx):
            out[i] = seq[r, ids.shape[1]:].tolist()
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_through_the_lean_step_equals_transformers_generate(tiny_tokenizer, family, monkeypatch):
    model = build(family, len(tiny_tokenizer))
    calls = []
    real = LlamaDecoder.step
    monkeypatch.setattr(LlamaDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    cfg = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=4, precision="fp32", stop_token_ids=())
    out = generate(model, tiny_tokenizer, prompts(), cfg)
    assert len(calls) == 3 * (MAX_NEW - 1)  # 3 batches, every decoding step lean
    assert [c.token_ids for c in out.completions] == hf_greedy(model, tiny_tokenizer, 4)


def test_models_the_lean_step_does_not_cover_use_the_forward(tiny_tokenizer):
    """A sliding window not longer than the batch, eager attention, a DoRA adapter, fp32 weights for a bf16 step,
    a forward hook, transformers' own cache: `build` declines, and the engine's outputs still equal generate's."""
    from peft import LoraConfig, get_peft_model

    vocab = len(tiny_tokenizer)
    enc = encode_prompts(tiny_tokenizer, prompts())
    ids, mask, positions = left_pad(enc, tiny_tokenizer.pad_token_id)
    cap = ids.shape[1] + MAX_NEW

    def built(model, cache_cls=None, dtype=torch.float32):
        cache = make_cache(model.config, cap) if cache_cls is None else cache_cls(config=model.config)
        with torch.inference_mode():
            ModelStep(model).prefill(ids, mask, positions, cache)
        return LlamaDecoder.build(model, cache, None, cap, dtype)

    from transformers import DynamicCache

    assert built(build("llama", vocab)) is not None
    assert built(build("mistral", vocab, sliding_window=cap + 1)) is not None
    assert built(build("mistral", vocab, sliding_window=cap)) is None
    assert built(build("llama", vocab, attn_implementation="eager")) is None
    assert built(build("llama", vocab), cache_cls=DynamicCache) is None
    assert built(build("llama", vocab), dtype=torch.bfloat16) is None
    hooked = build("llama", vocab)
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert built(hooked) is None
    dora = get_peft_model(build("llama", vocab), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                            init_lora_weights=False))
    assert built(dora) is None
    cfg = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=4, precision="fp32", stop_token_ids=())
    for model in (build("mistral", vocab, sliding_window=8), dora):
        out = generate(model, tiny_tokenizer, prompts(), cfg)
        assert [c.token_ids for c in out.completions] == hf_greedy(model, tiny_tokenizer, 4)


def test_lora_layers_are_applied_as_peft_applies_them(tiny_tokenizer, monkeypatch):
    """A PEFT LoRA model (adapter not merged, two adapters' worth of targets incl. the MLP) decodes through the
    lean step: the same logits bit for bit as PeftModel's forward, and the same greedy tokens as its generate;
    with the adapter disabled, the base model's tokens."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build("llama", len(tiny_tokenizer)),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])).eval()
    for dtype in (torch.float32, torch.bfloat16):
        lean = step_logits(lora, tiny_tokenizer, "lean", dtype)
        assert all(torch.equal(a, b) for a, b in zip(lean, step_logits(lora, tiny_tokenizer, "forward", dtype)))
    calls = []
    real = LlamaDecoder.step
    monkeypatch.setattr(LlamaDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    cfg = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=4, precision="fp32", stop_token_ids=())
    adapted = generate(lora, tiny_tokenizer, prompts(), cfg)
    assert calls and [c.token_ids for c in adapted.completions] == hf_greedy(lora, tiny_tokenizer, 4)
    with lora.disable_adapter():
        base = generate(lora, tiny_tokenizer, prompts(), cfg)
        assert [c.token_ids for c in base.completions] == hf_greedy(lora, tiny_tokenizer, 4)
    assert [c.token_ids for c in base.completions] != [c.token_ids for c in adapted.completions]
