"""Tiny offline building blocks for tests: a byte-level BPE tokenizer with a ChatML template, a tiny
random Llama, and a recipe that trains them in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    rng = random.Random(0)
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]
    lines = ["system user assistant You are a helpful assistant. Reply with the answer only. What is the date?"]
    for _ in range(300):
        lines.append(f"Rewrite the date '{rng.choice(months)} {rng.randint(1, 28)}, {rng.randint(1990, 2030)}' in "
                     f"YYYY-MM-DD format. {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        lines.append(f"What is {rng.randint(0, 99)} + {rng.randint(0, 99)}? Reply with the number only.")
    return lines


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.model import FALLBACK_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = FALLBACK_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


# method options that fit the tiny Llama (hidden 64, intermediate 128, kv 32, 2 layers); others take defaults
TINY_METHOD_OPTIONS = {"houlsby": {"bottleneck": 8}, "loreft": {"r": 2}, "diablo": {"num_blocks": 8}, "vera": {"r": 8},
                       "galore": {"rank": 4}, "lift": {"rank": 4}, "cola": {"r": 4, "alpha": 8}}


def tiny_recipe_dict(model_dir: Path, output_dir: Path, **sections) -> dict:
    """A recipe for the tiny model on the built-in date task that trains in seconds."""
    recipe = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"builtin": "date_format", "n": 64}, "eval": {"builtin": "date_format", "split": "eval",
                                                                          "n": 8}, "max_length": 96},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        # compile off: the suite tests the loop, not the compiler (tests/train/test_engine.py tests `compile`,
        # the default `auto`); compiling every tiny run would multiply the suite's time
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0,
                  "compile": False},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
    }
    for k, v in sections.items():
        # a method/objective section is replaced whole (its options belong to its name); others merge
        merge = isinstance(v, dict) and k not in ("method", "objective")
        recipe[k] = {**recipe.get(k, {}), **v} if merge else v
    return recipe
