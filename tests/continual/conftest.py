"""Fixtures of the continual tests: small general-ability files."""

from __future__ import annotations

import pytest


@pytest.fixture()
def general_files(tmp_path):
    """A small text file (perplexity, GeRe) and a 3-item multiple-choice file."""
    import json

    text = tmp_path / "general.txt"
    text.write_text(" ".join(f"The year {1990 + i} came after {1989 + i} and before {1991 + i}." for i in range(80)))
    mc = tmp_path / "mc.jsonl"
    items = [{"question": {"stem": f"What is {i} + 1?", "choices": [{"label": "A", "text": str(i + 1)},
                                                                     {"label": "B", "text": str(i + 7)}]},
              "answerKey": "A"} for i in range(3)]
    mc.write_text("".join(json.dumps(x) + "\n" for x in items))
    return text, mc
