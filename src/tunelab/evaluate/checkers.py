"""Answer checkers for generation tasks, and user JSONL generation eval files.

A checker decides whether a model's completion is correct for a reference: `check(prediction, reference)`.

  exact     whitespace-normalised equality (the default; the built-in tasks' own checkers are stricter
            or looser per task and are used for built-in tasks)
  numeric   the LAST number in the prediction equals the reference number (commas ignored; relative
            tolerance 1e-6); a reference like "... #### 42" (GSM8K) is read as 42
  regex     the reference is a Python regular expression searched in the stripped prediction
            (`re.search`; anchor it with ^...$ for a full match)
  contains  the reference occurs in the prediction, case-insensitively, after whitespace normalisation

A user generation file is JSONL, one item per line:
  {"prompt": "...", "reference": "...", "checker": "numeric"}       (checker optional: file default)
  {"messages": [{"role": "user", "content": "..."}], "answer": "..."}  ("answer" is an alias of "reference")
  optional "system": a system prompt for that item.
Every malformed line is reported with file and line (`data.jsonl:7: ...`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.formats import DataError, iter_jsonl, open_text  # noqa: F401 (re-exported)

Checker = Callable[[str, str], bool]

_WS = re.compile(r"\s+")
# Numbers with optional sign, thousands separators, decimals and exponent: -1,234.5e-3
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def normalise(text: str) -> str:
    return _WS.sub(" ", text.strip())


def exact(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def parse_number(text: str) -> float | None:
    """The last number in `text` (after a GSM8K-style '####' marker if there is one), or None."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(prediction: str, reference: str, rel_tol: float = 1e-6) -> bool:
    want, got = parse_number(reference), parse_number(prediction)
    if want is None or got is None:
        return False
    return math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-9)


def regex(prediction: str, reference: str) -> bool:
    return re.search(reference, prediction.strip()) is not None


def contains(prediction: str, reference: str) -> bool:
    return normalise(reference).casefold() in normalise(prediction).casefold()


CHECKERS: dict[str, Checker] = {"exact": exact, "numeric": numeric, "regex": regex, "contains": contains}


def get_checker(name: str) -> Checker:
    if name not in CHECKERS:
        raise KeyError(f"unknown checker {name!r}; choose one of {', '.join(CHECKERS)}")
    return CHECKERS[name]


# -- reading eval files ---------------------------------------------------------------------------


@dataclass
class GenItem:
    """A generation item: the chat up to the answer, the reference, and the checker that scores it."""

    messages: list[dict[str, str]]
    reference: str
    checker: str = "exact"
    origin: str = ""


def _item_messages(obj: dict, where: str) -> list[dict[str, str]]:
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        and m.get("role") in ("system", "user", "assistant")
                                                        for m in msgs)):
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] == "assistant":  # a full conversation: generate the last assistant turn
            msgs = msgs[:-1]
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: needs a non-empty string field 'prompt' (or 'messages')")
    msgs = [{"role": "user", "content": prompt}]
    if isinstance(obj.get("system"), str):
        msgs.insert(0, {"role": "system", "content": obj["system"]})
    return msgs


def load_generation_file(path: str | Path, default_checker: str = "exact", n: int | None = None) -> list[GenItem]:
    """Read a user generation eval file (see the module docstring); validates every line."""
    get_checker(default_checker)
    items: list[GenItem] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        messages = _item_messages(obj, where)
        ref = obj.get("reference", obj.get("answer"))
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(ref, str):
            raise DataError(f"{where}: needs a string field 'reference' (or 'answer')")
        checker = obj.get("checker", default_checker)
        if checker not in CHECKERS:
            raise DataError(f"{where}: unknown checker {checker!r}; choose one of {', '.join(CHECKERS)}")
        if checker == "regex":
            try:
                re.compile(ref)
            except re.error as e:
                raise DataError(f"{where}: reference is not a valid regular expression: {e}") from None
        if checker == "numeric" and parse_number(ref) is None:
            raise DataError(f"{where}: checker 'numeric' needs a number in the reference, got {ref!r}")
        items.append(GenItem(messages, ref, checker, where))
        if n is not None and len(items) >= n:
            break
    if not items:
        raise DataError(f"{path}: no records")
    return items
