"""Final answers of math completions and references, and their comparison (used by the `math` reward).

Extraction (the LAST match wins, as graders read the final answer): `\\boxed{...}` (nested braces kept),
GSM8K's `#### N`, "the answer is N", else the last number in the text. Numbers lose thousands separators,
currency and units ("$1,234.50 dollars" -> 1234.5). Comparison: HF's `math-verify` (symbolic: fractions,
LaTeX, sets) when it is installed and parses both sides, else numeric equality (relative 1e-6), else exact
string match after whitespace normalisation.
"""

from __future__ import annotations

import functools
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*([^\n]+)", re.IGNORECASE)


def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i: j - 1].strip() if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion or a reference (module docstring); None when there is none."""
    if (b := boxed(text)) is not None:
        return b
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            nums = _NUMBER.findall(found[-1])
            return nums[0] if nums else found[-1].strip().rstrip(".")
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def to_number(text: str) -> float | None:
    nums = _NUMBER.findall(text.replace("$", ""))
    if len(nums) != 1:
        return None
    try:
        return float(nums[0].replace(",", ""))
    except ValueError:
        return None


@functools.cache
def _warm_math_verify() -> None:
    """Load math-verify's LaTeX grammar and sympy's paths once under a generous bound: its first parse builds the
    grammar, which takes seconds (more on a loaded machine) and would otherwise hit the 5 s per-parse timeout,
    scoring a correct first answer 0."""
    from math_verify import parse, verify

    g = parse("$\\frac{1}{2}$", parsing_timeout=120)
    verify(g, parse("$0.5$", parsing_timeout=120), timeout_seconds=120)


def _math_verify(gold: str, pred: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:  # optional: numeric comparison below
        return None
    try:
        _warm_math_verify()
        g, p = parse(gold), parse(pred)
        if not g or not p:
            return None
        return bool(verify(g, p))
    except Exception:  # noqa: BLE001 - a parser failure falls back to the numeric comparison
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    a, b = to_number(pred), to_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    verified = _math_verify(gold, pred)
    if verified is not None:
        return verified
    return " ".join(pred.split()) == " ".join(gold.split())
