"""llama.cpp through `llama-cpp-python` (optional): the real client of GGUF exports.

`llama-cpp-python` is an sdist that compiles llama.cpp when installed (`pip install llama-cpp-python`, many
minutes), so nothing in the default install needs it: `tunelab chat FILE.gguf`, the interop tests
(`make test-interop`) and `benchmarks/gguf_agreement.py` import it through :func:`require`.

Generation here is on token ids (the prompt rendered and tokenized by the HF tokenizer), so a comparison with an
HF model checks the weights; :func:`tokenize` checks llama.cpp's own tokenizer separately.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

HINT = "pip install llama-cpp-python (an sdist: it compiles llama.cpp, several minutes on 2 cores)"


def require():
    """The `llama_cpp` module, or an ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"GGUF models run through llama.cpp: {HINT}") from e
    return llama_cpp


def _has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load(path: str | os.PathLike[str], n_ctx: int = 2048, n_threads: int | None = None, logits_all: bool = False):
    """A `llama_cpp.Llama` on `path` (quiet; CPU threads: all cores unless `n_threads`).

    On CPUs with AMX (Sapphire Rapids and later) prompts are evaluated one token per batch: the llama-cpp-python
    0.3.36 CPU build measured here segfaults on multi-token batches through its AMX kernels for Q4_0 / Q4_1 /
    Q8_0 weights (llama.cpp's own SmolLM2 Q4_1 GGUF as well), and single-token batches do not use them.
    `$TUNELAB_LLAMACPP_BATCH` overrides the batch size."""
    llama_cpp = require()
    batch = int(os.environ.get("TUNELAB_LLAMACPP_BATCH", "1" if _has_amx() else "512"))
    return llama_cpp.Llama(str(Path(path)), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), verbose=False,
                           logits_all=logits_all, n_batch=batch, n_ubatch=batch)


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization of `text`, special tokens parsed, BOS as the GGUF's add_bos_token says."""
    return llm.tokenize(text.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                        special=True)


def stream(llm, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int], *, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[int]:
    """New token ids, one at a time, until a stop id (not yielded) or `max_new_tokens`. temperature 0: greedy."""
    if seed is not None:
        llm.set_seed(seed)
    sampling = {"temp": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else \
        {"temp": 0.0, "top_k": 1, "top_p": 1.0}
    for n, tok in enumerate(llm.generate(list(prompt_ids), reset=True, **sampling)):
        if tok in stop_ids:
            return
        yield int(tok)
        if n + 1 >= max_new_tokens:
            return


def greedy(llm, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Greedy continuation of `prompt_ids`: (new ids without the stop id, whether a stop id ended it)."""
    out: list[int] = []
    stopped = True
    for n, tok in enumerate(llm.generate(list(prompt_ids), reset=True, temp=0.0, top_k=1, top_p=1.0)):
        if tok in stop_ids:
            break
        out.append(int(tok))
        if n + 1 >= max_new_tokens:
            stopped = False
            break
    return out, stopped


def compare_with_hf(model, tokenizer, llm, chats: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[dict]:
    """Greedy generations of the HF `model` and of llama.cpp (`llm`) from the same prompt ids (the chat template
    rendered with the generation prompt, tokenized by `tokenizer`), one prompt at a time in float32. Per chat:
    {"hf": ids, "gguf": ids, "hf_stopped", "gguf_stopped", "same_prompt_tokens" (llama.cpp's own tokenizer
    gives the HF ids)}."""
    import torch

    from tunelab.data.encode import encode_prompt, render
    from tunelab.data.turns import stop_token_ids

    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    rows = []
    model.eval()
    for chat in chats:
        ids = encode_prompt(tokenizer, chat)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        hf_stopped = bool(out) and out[-1] in stops
        hf = out[:-1] if hf_stopped else out
        gg, gg_stopped = greedy(llm, ids, max_new_tokens, stops)
        rows.append({"hf": hf, "gguf": gg, "hf_stopped": hf_stopped, "gguf_stopped": gg_stopped,
                     "same_prompt_tokens": tokenize(llm, render(tokenizer, chat, add_generation_prompt=True)) == ids})
    return rows
