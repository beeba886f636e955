import pytest

from tunelab.data.encode import IGNORE_INDEX, EncodeStats, encode_chat, encode_preference, encode_text
from tunelab.data.formats import ChatExample, DataError, PreferenceExample, TextExample

CHAT = ChatExample([
    {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"},
])


def targets(tok, enc):
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def test_completion_mask_is_last_answer_and_end_of_turn(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="completion")
    assert targets(tiny_tokenizer, enc) == "6<|im_end|>"
    # labels equal ids wherever they are not masked
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc["input_ids"], enc["labels"]))


def test_assistant_mask_covers_every_assistant_turn(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="assistant")
    assert targets(tiny_tokenizer, enc) == "4<|im_end|>6<|im_end|>"


def test_full_mask_covers_everything(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="full")
    assert enc["labels"] == enc["input_ids"][: len(enc["labels"])] or all(
        lab != IGNORE_INDEX for lab in enc["labels"][:-1])
    assert sum(lab != IGNORE_INDEX for lab in enc["labels"]) >= len(enc["input_ids"]) - 1


def test_truncation_policies(tiny_tokenizer):
    full = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="completion")
    n = len(full["input_ids"])
    stats = EncodeStats()
    assert encode_chat(tiny_tokenizer, CHAT, max_length=n - 1, truncation="drop", loss_mask="completion",
                       stats=stats) is None
    assert stats.dropped_too_long == 1
    with pytest.raises(DataError, match="exceed data.max_length"):
        encode_chat(tiny_tokenizer, CHAT, max_length=n - 1, truncation="error", loss_mask="completion")
    left = encode_chat(tiny_tokenizer, CHAT, max_length=n - 3, truncation="left", loss_mask="completion")
    assert left["input_ids"] == full["input_ids"][3:] and targets(tiny_tokenizer, left) == "6<|im_end|>"
    stats = EncodeStats()
    # cutting the end removes the completion: the example has no target left and is dropped, counted
    assert encode_chat(tiny_tokenizer, CHAT, max_length=5, truncation="right", loss_mask="completion",
                       stats=stats) is None
    assert stats.truncated == 1 and stats.dropped_no_target == 1


def test_text_gets_eos_and_full_labels(tiny_tokenizer):
    enc = encode_text(tiny_tokenizer, TextExample("hello world"), max_length=50, truncation="error")
    assert enc["input_ids"][-1] == tiny_tokenizer.eos_token_id and enc["labels"] == enc["input_ids"]


def test_preference_pair_masks_only_the_responses(tiny_tokenizer):
    ex = PreferenceExample([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}],
                           [{"role": "assistant", "content": "5"}])
    enc = encode_preference(tiny_tokenizer, ex, max_length=100, truncation="error")
    assert targets(tiny_tokenizer, {"input_ids": enc["chosen_input_ids"], "labels": enc["chosen_labels"]}) == \
        "4<|im_end|>"
    assert targets(tiny_tokenizer, {"input_ids": enc["rejected_input_ids"], "labels": enc["rejected_labels"]}) == \
        "5<|im_end|>"


# -- token weights: the data's `loss_weights` column and instruction modelling (data.prompt_loss_weight) ------


def weighted(enc):
    """(token id, weight) of every position that carries loss (t >= 1, label != -100)."""
    return [(enc["input_ids"][t], enc["loss_weights"][t]) for t in range(1, len(enc["labels"]))
            if enc["labels"][t] != IGNORE_INDEX]


def test_no_weights_unless_asked(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="completion")
    assert "loss_weights" not in enc


def test_example_weights_number_and_list(tiny_tokenizer):
    plain = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="assistant")
    n_targets = sum(lab != IGNORE_INDEX for lab in plain["labels"][1:])
    ex = ChatExample(CHAT.messages, "f.jsonl:3", loss_weights=0.25)
    enc = encode_chat(tiny_tokenizer, ex, max_length=200, truncation="error", loss_mask="assistant")
    assert enc["labels"] == plain["labels"] and len(enc["loss_weights"]) == len(enc["labels"])
    assert [w for _, w in weighted(enc)] == [0.25] * n_targets
    assert sum(enc["loss_weights"]) == 0.25 * n_targets  # nothing outside the targets
    values = [float(i + 1) for i in range(n_targets)]
    enc = encode_chat(tiny_tokenizer, ChatExample(CHAT.messages, "f.jsonl:3", loss_weights=values), max_length=200,
                      truncation="error", loss_mask="assistant")
    assert [w for _, w in weighted(enc)] == values  # one value per target token, in order
    with pytest.raises(DataError, match=rf"f\.jsonl:3: field 'loss_weights' has {n_targets + 1} values but the "
                                        rf"example has {n_targets} target tokens"):
        encode_chat(tiny_tokenizer, ChatExample(CHAT.messages, "f.jsonl:3", loss_weights=values + [1.0]),
                    max_length=200, truncation="error", loss_mask="assistant")


def test_weights_follow_left_truncation(tiny_tokenizer):
    full = encode_chat(tiny_tokenizer, ChatExample(CHAT.messages, loss_weights=0.5), max_length=200,
                       truncation="error", loss_mask="completion")
    n = len(full["input_ids"])
    left = encode_chat(tiny_tokenizer, ChatExample(CHAT.messages, loss_weights=0.5), max_length=n - 3,
                       truncation="left", loss_mask="completion")
    assert left["loss_weights"] == full["loss_weights"][3:] and weighted(left) == weighted(full)


def test_prompt_loss_weight_covers_the_prompt_contents_not_the_template(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CHAT, max_length=200, truncation="error", loss_mask="completion",
                      prompt_loss_weight=0.1)
    by_weight = {w: tiny_tokenizer.decode([i for i, x in weighted(enc) if x == w]) for w in (0.1, 1.0)}
    assert by_weight[1.0] == "6<|im_end|>"  # the response keeps weight 1
    assert by_weight[0.1] == "What is 2 + 2?And 3 + 3?"  # the user turns' contents; no template token
    assert "assistant" not in by_weight[0.1] and "<|im_start|>" not in by_weight[0.1]
    # earlier assistant turns are neither prompt nor (with the completion mask) response
    assert set(w for _, w in weighted(enc)) == {0.1, 1.0}


def test_text_example_weights(tiny_tokenizer):
    enc = encode_text(tiny_tokenizer, TextExample("hello world", loss_weights=2.0), max_length=50, truncation="error")
    assert enc["loss_weights"] == [0.0] + [2.0] * (len(enc["input_ids"]) - 1)


LONG = ChatExample([{"role": "user", "content": "Write the date " + "again and " * 10},
                    {"role": "assistant", "content": "2021-03-05 " * 30}], "long.jsonl:1")


def test_default_truncation_keeps_the_prompt_start_and_the_response_that_fits(tiny_tokenizer, tmp_path):
    import json

    from tunelab.data.pipeline import encode_spec
    from tunelab.recipe import DataConfig, DatasetSpec

    full = encode_chat(tiny_tokenizer, LONG, max_length=10_000, truncation="error", loss_mask="completion")
    n_prompt = full["labels"].index(next(lab for lab in full["labels"] if lab != IGNORE_INDEX))
    max_length = n_prompt + 20  # the whole prompt and 20 of the response's tokens fit
    assert len(full["input_ids"]) > max_length + 20
    path = tmp_path / "long.jsonl"
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text("\n".join(json.dumps(r) for r in [{"messages": LONG.messages}, short]) + "\n")
    cfg = DataConfig(train=DatasetSpec(path=str(path)), eval=None, max_length=max_length)
    assert cfg.truncation == "right"
    encoded, stats = encode_spec(tiny_tokenizer, cfg.train, cfg)
    assert len(encoded) == 2 and stats.truncated == 1 and stats.dropped_too_long == 0 and stats.kept == 2
    assert "2 kept, 0 dropped as too long, 1 truncated" in stats.summary()
    assert stats.as_dict() == {"kept": 2, "dropped_too_long": 0, "truncated": 1, "dropped_no_target": 0}
    cut = encoded[0]
    # the start kept: the full example's first max_length tokens and their labels, unchanged
    assert cut["input_ids"] == full["input_ids"][:max_length] and cut["labels"] == full["labels"][:max_length]
    # the labels cover every kept response token (the prompt stays masked)
    assert all(lab == IGNORE_INDEX for lab in cut["labels"][:n_prompt])
    assert cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:] and len(cut["labels"][n_prompt:]) == 20
    # `drop` still drops it, counted
    dropped, dstats = encode_spec(tiny_tokenizer, cfg.train, cfg.model_copy(update={"truncation": "drop"}))
    assert len(dropped) == 1 and dstats.dropped_too_long == 1 and dstats.truncated == 0
