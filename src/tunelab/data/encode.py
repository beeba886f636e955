"""Examples -> token ids and labels through the tokenizer's chat template.

Loss masks are computed on characters, then mapped to tokens with the fast tokenizer's offsets:
the span of assistant turn i is [len(render(messages[:i], generation prompt)), len(render(messages[:i+1])))
with trailing whitespace after the end-of-turn token removed. This works for any template whose
renderings are prefix-stable (ChatML, Llama-3, Mistral, ...); a template that is not raises an error
rather than silently mis-masking. Labels are -100 where no loss is taken.

Masks:
  completion  the last assistant turn only (default: what instruction tuning optimises)
  assistant   every assistant turn of a multi-turn chat
  full        every token (continued pre-training style)

Truncation (`data.truncation`, applied to the whole rendered chat, after the masks are computed, so the labels of
the kept tokens are exactly those of the full example):
  right (default)  keep the first `max_length` tokens: the prompt's start and as much of the response as fits
                   (TRL's SFTTrainer `truncation_mode="keep_start"`); an example whose prompt alone fills
                   `max_length` keeps no target token and is dropped (counted as "no target")
  left             keep the last `max_length` tokens (the end of the response, the prompt's start cut)
  drop             leave the example out (counted)
  error            stop with the example's file:line
Preference pairs follow the same policy, as TRL's DPOTrainer / DataCollatorForPreference (`max_length`,
`truncation_mode`): each of prompt + chosen and prompt + rejected is cut on its own (right = TRL's `keep_start`:
both keep the whole prompt when it fits and as much of their response as fits; left = `keep_end`); a pair is
counted once as truncated when either side was cut, and dropped (counted as "no target") when a side keeps no
response token, as TRL drops pairs whose prompt alone fills `max_length`.

Token weights (`loss_weights` in the encoded dict, one float per token aligned with `labels`: weight t
scales the loss of the label at t; produced only when something asks for them):
  * the example's own `loss_weights` (a number for every target token, or one value per target token);
  * `prompt_loss_weight` w (instruction modelling, `data.prompt_loss_weight`): the tokens of the
    non-assistant messages' contents (system, user, tool; not the template's own tokens) become targets
    too, with weight w; the response targets keep weight 1 (or their own).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.core.constants import IGNORE_INDEX
from tunelab.data.formats import ChatExample, DataError, PreferenceExample, TextExample


@dataclass
class EncodeStats:
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts, for the run's summary.json."""
        return {"kept": self.kept, "dropped_too_long": self.dropped_too_long, "truncated": self.truncated,
                "dropped_no_target": self.dropped_no_target}

    def summary(self) -> str:
        return (f"{self.kept} kept, {self.dropped_too_long} dropped as too long, {self.truncated} truncated, "
                f"{self.dropped_no_target} dropped with no target token left")


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]], origin: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the [start, end) character span of each assistant turn."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(prefix) and full.startswith(upto) and len(upto) >= len(prefix)):
            raise DataError(f"{origin}: the chat template does not render turns as prefixes; cannot build loss masks")
        end = len(upto.rstrip())
        spans.append((len(prefix), end))
    return full, spans


def _in_spans(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    s, e = offset
    return s != e and any(a <= s < b for a, b in spans)


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids, offsets = _tokenize(tokenizer, text)
    return ids, [i if _in_spans(o, spans) else IGNORE_INDEX for i, o in zip(ids, offsets)]


def content_spans(text: str, messages: list[dict[str, str]], roles: tuple[str, ...], origin: str = ""):
    """[start, end) character spans of the contents of the messages with one of `roles` in the rendered chat.

    Found in order (each search starts where the previous message's content ended), so a repeated content
    maps to its own turn. A template that rewrites a content (so it cannot be found) is an error.
    """
    spans, pos = [], 0
    for m in messages:
        if not m["content"]:
            continue
        at = text.find(m["content"], pos)
        if at < 0:
            raise DataError(f"{origin}: the chat template rewrites a {m['role']} message; cannot locate its tokens "
                            "for data.prompt_loss_weight")
        pos = at + len(m["content"])
        if m["role"] in roles:
            spans.append((at, pos))
    return spans


def token_weights(ids: list[int], labels: list[int], offsets, example_weights, prompt_spans, prompt_loss_weight,
                  origin: str = "") -> tuple[list[int], list[float] | None]:
    """(labels, loss_weights): None when neither the example nor `prompt_loss_weight` asks for weights.

    Target tokens (position >= 1, label != -100) get the example's weight (a number, or the next value of its
    list: the count must match), else 1. With `prompt_loss_weight` w, untargeted tokens inside `prompt_spans`
    become targets with weight w. Position 0 never carries loss (the causal shift), so it gets weight 0.
    """
    if example_weights is None and prompt_loss_weight is None:
        return labels, None
    weights = [0.0] * len(ids)
    targets = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    if isinstance(example_weights, list):
        if len(example_weights) != len(targets):
            raise DataError(f"{origin}: field 'loss_weights' has {len(example_weights)} values but the example has "
                            f"{len(targets)} target tokens")
        for t, v in zip(targets, example_weights):
            weights[t] = v
    else:
        for t in targets:
            weights[t] = 1.0 if example_weights is None else example_weights
    if prompt_loss_weight is not None:
        labels = list(labels)
        for t in range(1, len(ids)):
            if labels[t] == IGNORE_INDEX and _in_spans(offsets[t], prompt_spans):
                labels[t], weights[t] = ids[t], prompt_loss_weight
    return labels, weights


def _truncate(ids: list[int], labels: list[int], max_length: int, policy: str, origin: str, stats: EncodeStats,
              weights: list[float] | None = None):
    """(ids, labels, weights) cut to `max_length` by `policy`, or None when the example is dropped."""
    if len(ids) <= max_length:
        return ids, labels, weights
    if policy == "error":
        raise DataError(f"{origin}: {len(ids)} tokens exceed data.max_length={max_length} (data.truncation=error)")
    if policy == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    cut = (lambda x: x[:max_length]) if policy == "right" else (lambda x: x[-max_length:])  # left: keep the end
    return cut(ids), cut(labels), cut(weights) if weights is not None else None


def _encoded(ids, labels, weights) -> dict:
    out = {"input_ids": ids, "labels": labels}
    if weights is not None:
        out["loss_weights"] = weights
    return out


def encode_chat(tokenizer, ex: ChatExample, *, max_length: int, truncation: str, loss_mask: str,
                stats: EncodeStats | None = None, prompt_loss_weight: float | None = None) -> dict | None:
    stats = stats if stats is not None else EncodeStats()
    text, spans = assistant_spans(tokenizer, ex.messages, ex.origin)
    if loss_mask == "completion":
        spans = spans[-1:]
    elif loss_mask == "full":
        spans = [(0, len(text))]
    ids, offsets = _tokenize(tokenizer, text)
    labels = [i if _in_spans(o, spans) else IGNORE_INDEX for i, o in zip(ids, offsets)]
    prompt_spans = (content_spans(text, ex.messages, ("system", "user", "tool"), ex.origin)
                    if prompt_loss_weight is not None else [])
    labels, weights = token_weights(ids, labels, offsets, ex.loss_weights, prompt_spans, prompt_loss_weight,
                                    ex.origin)
    out = _truncate(ids, labels, max_length, truncation, ex.origin, stats, weights)
    if out is None:
        return None
    ids, labels, weights = out
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        stats.dropped_no_target += 1
        return None
    stats.kept += 1
    return _encoded(ids, labels, weights)


def encode_text(tokenizer, ex: TextExample, *, max_length: int, truncation: str, stats: EncodeStats | None = None):
    stats = stats if stats is not None else EncodeStats()
    ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels, weights = token_weights(ids, list(ids), None, ex.loss_weights, [], None, ex.origin)
    out = _truncate(ids, labels, max_length, truncation, ex.origin, stats, weights)
    if out is None:
        return None
    stats.kept += 1
    return _encoded(*out)


def encode_preference(tokenizer, ex: PreferenceExample, *, max_length: int, truncation: str,
                      stats: EncodeStats | None = None) -> dict | None:
    """Prompt + chosen and prompt + rejected, each with loss on the response only (+ the pair's `margin`, if any),
    each side cut to `max_length` by `truncation` (see the module docstring; the pair is counted once)."""
    stats = stats if stats is not None else EncodeStats()
    sides = {}
    for side in ("chosen", "rejected"):
        chat = ChatExample(ex.prompt + getattr(ex, side), ex.origin)
        text, spans = assistant_spans(tokenizer, chat.messages, ex.origin)
        n_prompt_turns = sum(m["role"] == "assistant" for m in ex.prompt)
        sides[side] = _tokenize_with_mask(tokenizer, text, spans[n_prompt_turns:])
    too_long = [side for side, (ids, _) in sides.items() if len(ids) > max_length]
    if too_long and truncation == "error":
        side = too_long[0]
        raise DataError(f"{ex.origin}: {side} has {len(sides[side][0])} tokens > data.max_length={max_length}")
    if too_long and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    cut = (lambda x: x[:max_length]) if truncation == "right" else (lambda x: x[-max_length:])  # left: keep the end
    out = {}
    for side, (ids, labels) in sides.items():
        if side in too_long:
            ids, labels = cut(ids), cut(labels)
            if all(lab == IGNORE_INDEX for lab in labels[1:]):  # the prompt alone fills max_length: no response
                stats.dropped_no_target += 1
                return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    if too_long:
        stats.truncated += 1
    if ex.margin is not None:
        out["margin"] = ex.margin
    stats.kept += 1
    return out


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat up to and including the assistant generation prompt (for generation)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_examples(tokenizer, examples: list, *, max_length: int, truncation: str, loss_mask: str,
                    prompt_loss_weight: float | None = None):
    """Encode a list of unified examples; returns (encoded, stats). Dropped examples are counted, never silent."""
    stats = EncodeStats()
    encoded = []
    for ex in examples:
        if isinstance(ex, ChatExample):
            e = encode_chat(tokenizer, ex, max_length=max_length, truncation=truncation, loss_mask=loss_mask,
                            stats=stats, prompt_loss_weight=prompt_loss_weight)
        elif isinstance(ex, TextExample):
            e = encode_text(tokenizer, ex, max_length=max_length, truncation=truncation, stats=stats)
        elif isinstance(ex, PreferenceExample):
            e = encode_preference(tokenizer, ex, max_length=max_length, truncation=truncation, stats=stats)
        else:
            raise TypeError(f"cannot encode {type(ex).__name__}")
        if e is not None:
            encoded.append(e)
    return encoded, stats
