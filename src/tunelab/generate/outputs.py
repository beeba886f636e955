"""What the engine returns: one Completion per generated sequence, and the call's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """One generated sequence. `token_ids` run up to and including the token that stopped it (EOS, end of
    turn, or the one completing a stop string); `text` is their decoding, cut before a stop string."""

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # one per token id (GenerateConfig.return_logprobs)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # real (unpadded) prompt tokens, each prompt counted once
    new_tokens: int = 0  # generated tokens kept (up to each stop), over all completions
    seconds: float = 0.0
    first_token_seconds: list[float] = field(default_factory=list)  # per batch: its start -> its first token
    batches: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class GenerationOutput:
    completions: list[Completion]  # prompt i's completions at i*n .. i*n + n - 1 (n = num_return_sequences)
    stats: GenerationStats

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]
