"""Where a model's turn ends: the chat template's end-of-turn token and the ids generation should stop on.

A fine-tuned model "never stops" when the token its chat template closes an assistant turn with (ChatML's
`<|im_end|>`, Llama 3's `<|eot_id|>`, Mistral's `</s>`) is not among the ids generation stops on
(`generation_config.eos_token_id`, the tokenizer's EOS). The template is the ground truth of what the model
was trained to emit, so the end-of-turn token is read from it: render a conversation whose assistant reply is a
sentinel, and take the first special token of what the template writes after the sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass

_SENTINEL = "XQZSENTINELZQX"


@dataclass(frozen=True)
class EndOfTurn:
    """The chat template's end of an assistant turn: `suffix` is all it writes after the reply (e.g.
    "<|im_end|>\\n"), `token` / `token_id` the first special token in it (None when it writes none)."""

    suffix: str
    token: str | None
    token_id: int | None


def _special_tokens(tokenizer) -> dict[str, int]:
    """Text -> id of the tokenizer's special / added tokens (those a template writes as markers)."""
    out = {}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        out[str(added)] = int(i)
    for t in tokenizer.all_special_tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0:
            out[t] = tid
    return out


def end_of_turn(tokenizer) -> EndOfTurn | None:
    """The end-of-turn marker of `tokenizer`'s chat template; None when there is no template or it cannot render
    a user / assistant exchange."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no end of turn we can find
        return None
    at = text.rfind(_SENTINEL)
    if at < 0:
        return None
    suffix = text[at + len(_SENTINEL):]
    specials = _special_tokens(tokenizer)
    # the earliest special token in the suffix (longest first at one position: "</s>" before "<")
    best: tuple[int, int, str] | None = None
    for tok_text in specials:
        pos = suffix.find(tok_text)
        if tok_text and pos >= 0 and (best is None or (pos, -len(tok_text)) < (best[0], -best[1])):
            best = (pos, len(tok_text), tok_text)
    if best is None:
        return EndOfTurn(suffix, None, None)
    return EndOfTurn(suffix, best[2], specials[best[2]])


def as_id_list(value) -> list[int]:
    """`eos_token_id` as a config holds it (None, an int, or a list) -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id generation should stop on: the generation config's EOS ids, the tokenizer's EOS and the
    template's end-of-turn token, in that order, without repeats."""
    ids = as_id_list(getattr(generation_config, "eos_token_id", None))
    ids += as_id_list(tokenizer.eos_token_id)
    eot = end_of_turn(tokenizer)
    if eot is not None and eot.token_id is not None:
        ids.append(eot.token_id)
    return list(dict.fromkeys(ids))
