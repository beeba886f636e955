"""Default stop ids and stop-string cutting."""

from __future__ import annotations

from types import SimpleNamespace

from tunelab.generate.stops import StopStrings, default_stop_ids


def test_default_stop_ids(tiny_tokenizer):
    # the tiny tokenizer: EOS = <|im_end|> (2); <|endoftext|> is its unknown token, so not a stop
    assert default_stop_ids(tiny_tokenizer) == (2,)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 2]))
    assert default_stop_ids(tiny_tokenizer, model) == (2, 1)


def test_stop_strings_cut_before_the_first(tiny_tokenizer):
    s = StopStrings(tiny_tokenizer, ("\n\n", "###"))
    assert s.cut("a ### b\n\nc") == ("a ", True)
    assert s.cut("abc") == ("abc", False)
    assert not StopStrings(tiny_tokenizer, ())
