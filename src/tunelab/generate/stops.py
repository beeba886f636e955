"""Stop strings: detected as tokens arrive, cut from the final text. (Stop token ids: tunelab.data.turns.)"""

from __future__ import annotations


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
