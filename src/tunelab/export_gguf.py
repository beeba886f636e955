"""GGUF export: an HF checkpoint of a Llama-family model -> one `.gguf` file for llama.cpp, Ollama, LM Studio.

Written with the `gguf` package alone (no compiled llama.cpp): metadata under llama.cpp's key names, the
tokenizer (byte-level BPE, `tokenizer.ggml.model = gpt2`: tokens, token types, merges, special ids, add_bos)
and the chat template; tensors streamed one at a time from the safetensors files through
:class:`tunelab.weights.CheckpointReader` and written straight to a temporary file renamed into place.

Architectures: `LlamaForCausalLM` (SmolLM2 is one), `MistralForCausalLM` (llama.cpp runs it as `llama`, as its
own converter writes it; transformers' GGUF loader then builds a LlamaForCausalLM, the same computation up to
Mistral's sliding window) and `Qwen2ForCausalLM` (`qwen2`, with q/k/v biases).

Q/K permutation (llama, mistral): HF checkpoints rotate the two halves of each head (`rotate_half`), GGUF's
llama graph rotates interleaved pairs. Each head's rows [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] are re-ordered to
[x_0, y_0, x_1, y_1, ...]: `W.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)`, with
`n_head` = attention heads for q_proj and key/value heads for k_proj. qwen2 uses NeoX-style rope: no permutation.

Quantisation (`quant`), per tensor: 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them;
* `f32`, `f16`, `bf16`: every matrix in that type;
* `q8_0`: 32-value blocks, one f16 scale each (8.5 bits per weight);
* `q4_0`: 32-value blocks of 4-bit values and an f16 scale (4.5 bits per weight); the token embedding and an
  untied output matrix are written as Q8_0 (llama.cpp's own `q4_0` gives them a higher-precision type too: they
  hurt most when quantised coarsely).
A matrix whose rows are not a multiple of 32 cannot be block-quantised and is written as F16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.data.turns import end_of_turn
from tunelab.weights import CheckpointReader

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (architecture, tokenizer or rope scaling not supported)."""


# HF architecture -> (llama.cpp architecture, permute q/k)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary layout -> GGUF llama's interleaved pairs (module docstring); w: [rows, cols]."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer ------------------------------------------------------------------------------------------------

def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the tokenizer's pre-tokenizer, so llama.cpp splits text the way the
    HF tokenizer the model was trained with does. Matched on the pre-tokenizer's structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's split regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds and kinds[0] == "Split":
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
        except ImportError:  # older transformers: only the names below are known
            splits = {}
        for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):
            if splits.get(name) == pattern:
                return name
    raise GGUFExportError(
        f"no llama.cpp pre-tokenizer is known for this tokenizer's pre_tokenizer {json.dumps(pre)[:200]}; "
        "pass pre=... (a `tokenizer.ggml.pre` name llama.cpp knows) to write it anyway")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def gguf_vocab(tokenizer, vocab_size: int, pre: str | None = None) -> Vocab:
    """Tokens (padded to the model's `vocab_size` with `[PAD<i>]`), their types and the merges of a byte-level
    BPE fast tokenizer. Types: added special tokens CONTROL, other added tokens USER_DEFINED, padding UNUSED."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"only byte-level BPE tokenizers are written (tokenizer.ggml.model gpt2); this one "
                              f"is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, [int(t) for t in types], merges, pre or _pre_tokenizer_name(data))


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    v = gguf_vocab(tokenizer, vocab_size, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    writer.add_token_merges(v.merges)
    for add, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                     tokenizer.eos_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id),
                     (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            add(int(tid))
    eot = end_of_turn(tokenizer)
    if eot is not None and eot.token_id is not None and eot.token_id != tokenizer.eos_token_id:
        writer.add_eot_token_id(eot.token_id)  # llama.cpp stops on it as well as on EOS
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- hyper-parameters and tensors ------------------------------------------------------------------------------

def _add_hparams(writer, cfg: dict[str, Any], name: str) -> None:
    import gguf

    rope = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or (cfg.get("rope_parameters") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"config rope_scaling type {rope_type!r} is not written to GGUF (default rope only)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    plain = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
    if quant in plain:
        return plain[quant]
    if shape[-1] % 32:
        return Q.F16  # block quants need whole 32-value blocks per row
    if quant == "q4_0" and gguf_name.split(".")[0] in ("token_embd", "output"):
        return Q.Q8_0
    return Q.Q8_0 if quant == "q8_0" else Q.Q4_0


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    """float tensor -> the bytes (numpy) GGUF stores for `qtype`."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = t.to(torch.float32).numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType


def write_gguf(model_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *, quant: str = "f16",
               tokenizer=None, name: str | None = None, pre: str | None = None) -> Path:
    """Write the HF checkpoint in `model_dir` (config.json + safetensors + tokenizer) as a GGUF file.

    `tokenizer`: the tokenizer to embed (default: the one saved in `model_dir`); `name`: `general.name`
    (default: the directory's name); `pre`: override llama.cpp's
    pre-tokenizer name. Written to a temporary file beside `out_file` and renamed, so a failure leaves nothing.
    """
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"quant {quant!r}: choose one of {', '.join(QUANTS)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise GGUFExportError(f"architecture {archs[0] if archs else '?'} is not written to GGUF; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    arch, permute = ARCHITECTURES[archs[0]]
    name = name or model_dir.name
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    names_map = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_layers)

    plan = []  # (hf name, gguf name, shape, ggml type)
    for hf in reader.names():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
            continue  # tied: llama.cpp reuses token_embd, and readers infer tying from its absence
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        g = names_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise GGUFExportError(f"tensor {hf!r} has no GGUF name for architecture {arch}")
        shape = reader.shape(hf)
        plan.append((hf, g, shape, _tensor_type(g, shape, quant)))

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_hparams(writer, cfg, name)
        writer.add_file_type(FILE_TYPES[quant])
        _add_tokenizer(writer, tokenizer, cfg["vocab_size"], pre)
        for _, g, shape, qtype in plan:
            writer.add_tensor_info(g, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf, g, _, qtype in plan:  # one tensor in memory at a time
            t = reader.get(hf).float()
            if permute and g.endswith("attn_q.weight"):
                t = permute_qk(t, heads)
            elif permute and g.endswith("attn_k.weight"):
                t = permute_qk(t, kv_heads)
            writer.write_tensor_data(_encode(t, qtype))
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return out_file
