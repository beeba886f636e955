"""Lists in the docs that name registered plug-ins are the registry's lists (they went stale before: README and
architecture.md named 6 objectives when 11 were registered)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def backticked_between(text: str, start: str, end: str) -> set[str]:
    """The `identifiers` in backticks between the first `start` and the next `end`."""
    i = text.index(start)
    j = text.index(end, i + len(start))
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text[i:j]))


@pytest.mark.parametrize("doc,start,end", [
    ("README.md", "Objectives (`objective.name`", "Methods ("),
    ("docs/architecture.md", "Registered (`tunelab objectives`", "References for preference losses"),
])
def test_docs_list_exactly_the_registered_objectives(doc, start, end):
    from tunelab.objectives.base import list_objectives

    named = backticked_between((ROOT / doc).read_text(), start, end)
    assert named == set(list_objectives()), f"{doc}: lists {sorted(named)}"
