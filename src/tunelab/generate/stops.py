"""When a completion ends: stop token ids (EOS, end of turn) and stop strings."""

from __future__ import annotations

# Special tokens that end an assistant turn in the chat templates of common model families (ChatML / SmolLM /
# Qwen, Llama 3, Gemma, Phi-3); only those the tokenizer has as single tokens are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def default_stop_ids(tokenizer, model=None) -> tuple[int, ...]:
    """The tokenizer's EOS, the model's generation-config EOS (one id or several) and the end-of-turn tokens
    the tokenizer knows, in that order, without repeats."""
    ids = _as_list(getattr(tokenizer, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None)
    ids += _as_list(getattr(gen_cfg, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in END_OF_TURN_TOKENS:
        i = vocab.get(tok)
        if i is not None and i != unk:
            ids.append(int(i))
    return tuple(dict.fromkeys(ids))


class StopStrings:
    """Detects stop strings in each row's completion as tokens arrive, and cuts final texts before them.

    Each step decodes only the tail of an active row (enough tokens to hold the longest stop string: every
    token decodes to at least one character, plus a margin for tokens that decode to none, such as the first
    bytes of a multi-byte character).
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.strings = tuple(stop_strings)
        self.skip = skip_special_tokens
        self.window = max((len(s) for s in self.strings), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hit(self, token_ids: list[int]) -> bool:
        """True if the text of `token_ids` (one completion so far) ends in a stop string within the tail
        window, i.e. the last token completed one."""
        tail = self.tokenizer.decode(token_ids[-self.window:], skip_special_tokens=self.skip)
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> tuple[str, bool]:
        """(text before the first stop string, whether one was found)."""
        first = min((i for i in (text.find(s) for s in self.strings) if i >= 0), default=-1)
        return (text[:first], True) if first >= 0 else (text, False)
