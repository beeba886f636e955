"""Stop-string cutting."""

from __future__ import annotations

from tunelab.generate.stops import StopStrings


def test_stop_strings_cut_before_the_first(tiny_tokenizer):
    s = StopStrings(tiny_tokenizer, ("\n\n", "###"))
    assert s.cut("a ### b\n\nc") == ("a ", True)
    assert s.cut("abc") == ("abc", False)
    assert not StopStrings(tiny_tokenizer, ())
