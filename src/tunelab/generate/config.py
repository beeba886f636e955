"""What to generate and how: one typed config passed whole to `tunelab.generate.generate`.

Option names are transformers' `GenerationConfig` names (`max_new_tokens`, `do_sample`, `temperature`, `top_p`,
`top_k`, `num_return_sequences`, `stop_strings`), which TRL passes through unchanged, so a recipe's rollout
section or a user's habits map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: core.precision.resolve_precision for the model's device


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings.

    Greedy (`do_sample=False`): the arg-max token at every step (temperature, top-p and top-k are ignored).
    Sampled: logits / temperature, then top-k, then top-p (nucleus), then one draw (tunelab.generate.sampling).

    `stop_token_ids=None` stops at the model's generation-config EOS ids, the tokenizer's EOS and the chat
    template's end-of-turn token (tunelab.data.turns.stop_token_ids); a completion also stops after a token that
    completes one of `stop_strings` (its text is cut before the stop string). `seed` makes sampling
    reproducible: each sequence draws from its own generator seeded by (seed, its index), so a completion does
    not depend on the batch it ran in; `seed=None` takes a seed from torch's global generator. `first_sequence`
    numbers this call's sequences from there (the index of sequence i is first_sequence + i): processes that
    each sample their slice of one global batch draw exactly what one process sampling all of it would.
    `precision` is the dtype the forward passes run in: floating weights in another dtype are cast for the
    duration of the call (and restored, bit for bit, afterwards).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_return_sequences: int = 1  # completions per prompt; the prompt is prefilled once and its cache shared
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    batch_size: int = 32  # sequences decoded together (prompts per batch = batch_size // num_return_sequences)
    seed: int | None = None
    first_sequence: int = 0  # index (RNG stream) of this call's first sequence in a larger batch
    return_logprobs: bool = False  # log p(token) of each generated token under softmax(logits / temperature)
    precision: str = "auto"
    drop_finished: bool = False  # compact finished rows out of the batch (not bit-identical to HF, see engine)
    skip_special_tokens: bool = True  # in the decoded text

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.first_sequence < 0:
            raise ValueError(f"first_sequence must be >= 0, got {self.first_sequence}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
