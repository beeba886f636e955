"""Records in the formats users have, turned into one unified example shape.

Formats (auto-detected from the keys of the first record, or set in the recipe):
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  messages           {"messages": [{"role", "content"}]}  (OpenAI)  or
                     {"conversations": [{"from", "value"}]}  (ShareGPT; human/gpt/system roles mapped)
  prompt_completion  {"prompt", "completion"}
  text               {"text"}
  preference         {"prompt", "chosen", "rejected"}; each a string or a list of messages

Unified examples:
  ChatExample(messages=[{"role", "content"}, ...])      for everything but text and preference
  TextExample(text=...)
  PreferenceExample(prompt=[messages], chosen=[messages], rejected=[messages])

Every record carries its origin (file and line, or dataset index) so that a malformed one stops the
run with an error naming file, line and field.

Token weights: a chat or text record may carry `loss_weights`, a number (every target token of the
example) or a list of numbers (one per target token, in order; `tunelab.data.encode` checks the count).
The objective multiplies each target token's loss by its weight (token-weighted CE, docs/objectives.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.io import NotUtf8, decode_utf8

FORMATS = ("alpaca", "messages", "prompt_completion", "text", "preference")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "bot": "assistant", "model": "assistant"}


class DataError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


@dataclass
class ChatExample:
    messages: list[dict[str, str]]
    origin: str = ""
    loss_weights: float | list[float] | None = None  # per target token (a list) or for all of them (a number)


@dataclass
class TextExample:
    text: str
    origin: str = ""
    loss_weights: float | list[float] | None = None


@dataclass
class PreferenceExample:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    origin: str = ""
    margin: float | None = None  # how much better chosen is (the record's `margin`; reward models: Llama 2's margin)


@dataclass
class Record:
    """A raw record and where it came from (`file.jsonl:12` or `hub:name[3]`)."""

    data: dict[str, Any]
    origin: str
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(record: dict[str, Any], origin: str = "") -> str:
    """The format a record's keys say (`origin`, its file:line, starts the error when none fits)."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{origin + ': ' if origin else ''}cannot detect the format of a record with keys {sorted(keys)}; set "
        f"data.*.format to one of {FORMATS}"
    )


def _field(rec: Record, name: str, kind: type = str, optional: bool = False) -> Any:
    if name not in rec.data or rec.data[name] is None:
        if optional:
            return None
        raise DataError(f"{rec.origin}: missing field {name!r}")
    value = rec.data[name]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{rec.origin}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _messages(rec: Record, value: Any, name: str) -> list[dict[str, str]]:
    """Normalise OpenAI or ShareGPT message lists; a plain string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{rec.origin}: field {name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        where = f"{rec.origin}: field {name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object")
        if "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif "from" in m and "value" in m:
            role, content = SHAREGPT_ROLES.get(str(m["from"]).lower()), m["value"]
            if role is None:
                raise DataError(f"{where}: unknown ShareGPT role {m['from']!r}")
        else:
            raise DataError(f"{where} needs role/content (OpenAI) or from/value (ShareGPT), has {sorted(m)}")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: unknown role {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: content must be a string")
        out.append({"role": role, "content": content})
    return out


def _loss_weights(rec: Record) -> float | list[float] | None:
    """The record's optional `loss_weights`: a non-negative number or a list of them."""
    value = rec.data.get("loss_weights")
    if value is None:
        return None
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if ok(value):
        return float(value)
    if isinstance(value, list) and value and all(ok(v) for v in value):
        return [float(v) for v in value]
    raise DataError(f"{rec.origin}: field 'loss_weights' must be a non-negative number or a non-empty list of them")


def _margin(rec: Record) -> float | None:
    """A preference record's optional `margin` (a number: how much better chosen is than rejected)."""
    value = rec.data.get("margin")
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise DataError(f"{rec.origin}: field 'margin' must be a number, got {value!r}")
    return float(value)


def to_example(rec: Record, fmt: str, system_prompt: str | None = None):
    """One raw record -> ChatExample | TextExample | PreferenceExample."""
    ex = _to_example(rec, fmt, system_prompt)
    if "loss_weights" in rec.data and rec.data["loss_weights"] is not None:
        if isinstance(ex, PreferenceExample):
            raise DataError(f"{rec.origin}: field 'loss_weights' is for SFT data (chat or text), not preference pairs")
        ex.loss_weights = _loss_weights(rec)
    return ex


def _to_example(rec: Record, fmt: str, system_prompt: str | None = None):
    sys_msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if fmt == "text":
        return TextExample(_field(rec, "text"), rec.origin)
    if fmt == "alpaca":
        instruction, output = _field(rec, "instruction"), _field(rec, "output")
        inp = _field(rec, "input", optional=True) or ""
        msgs = list(sys_msgs)
        if _field(rec, "system", optional=True):
            msgs = [{"role": "system", "content": rec.data["system"]}]
        for i, turn in enumerate(_field(rec, "history", list, optional=True) or []):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"{rec.origin}: field history[{i}] must be a [question, answer] pair of strings")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = f"{instruction}\n\n{inp}" if inp else instruction
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return ChatExample(msgs, rec.origin)
    if fmt == "prompt_completion":
        prompt, completion = _field(rec, "prompt"), _field(rec, "completion")
        return ChatExample(sys_msgs + [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": completion}],
                           rec.origin)
    if fmt == "messages":
        name = "messages" if "messages" in rec.data else "conversations"
        msgs = _messages(rec, _field(rec, name, list), name)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{rec.origin}: field {name!r} has no assistant message to learn from")
        if sys_msgs and msgs[0]["role"] != "system":
            msgs = sys_msgs + msgs
        return ChatExample(msgs, rec.origin)
    if fmt == "preference":
        prompt = _messages(rec, rec.data.get("prompt", []), "prompt") if rec.data.get("prompt") is not None else []
        chosen = _messages(rec, _field(rec, "chosen", (str, list)), "chosen")
        rejected = _messages(rec, _field(rec, "rejected", (str, list)), "rejected")
        # A plain-string answer is the assistant's reply, not a user turn.
        if isinstance(rec.data["chosen"], str):
            chosen = [{"role": "assistant", "content": rec.data["chosen"]}]
        if isinstance(rec.data["rejected"], str):
            rejected = [{"role": "assistant", "content": rec.data["rejected"]}]
        if chosen == rejected:
            raise DataError(f"{rec.origin}: fields 'chosen' and 'rejected' are identical")
        return PreferenceExample(sys_msgs + prompt, chosen, rejected, rec.origin, _margin(rec))
    raise DataError(f"unknown format {fmt!r}; choose one of {FORMATS}")


# -- reading files --------------------------------------------------------------------------------


def _open_bytes(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_text(path: str | Path) -> str:
    """A whole text file (gunzipped when it ends in .gz) as UTF-8; other bytes raise DataError naming file:line."""
    path = Path(path)
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        return decode_utf8(raw, path)
    except NotUtf8 as e:
        raise DataError(str(e)) from None


def open_text(path: Path):
    """A text file, transparently gunzipped when it ends in .gz, checked to be UTF-8 (see `read_text`)."""
    import io

    return io.StringIO(read_text(path), newline=None)  # universal newlines, as text mode reads them


def iter_jsonl(path: str | Path):
    """(line number, record) for each non-blank line; malformed lines raise DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with _open_bytes(path) as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = decode_utf8(raw_bytes, path, lineno)
            except NotUtf8 as e:
                raise DataError(str(e)) from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _kind(value: Any) -> str:
    """What Arrow must store a value as: one kind per field across all records ("list of str", "number", ...)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        inner = next((v for v in value if v is not None), None)
        return "list" if inner is None else f"list of {_kind(inner)}"
    return {str: "str", dict: "object"}.get(type(value), type(value).__name__)


def check_field_types(rows: list[dict[str, Any]], where) -> None:
    """Every field must hold one kind of value in every record (Arrow stores a column per field);
    `where(i)` names record i (file:line or file[i])."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None or (isinstance(value, list) and not value):
                continue
            kind = _kind(value)
            seen = first.setdefault(key, (kind, i))
            if seen[0] != kind and not (seen[0].startswith("list") and kind == "list"):
                raise DataError(f"{where(i)}: field {key!r} is a {kind} here but a {seen[0]} at {where(seen[1])}; a "
                                "field must have the same type in every record")


def load_records(path: str, split: str = "train", n: int | None = None) -> list[Record]:
    """Read records with HF `datasets` (jsonl, json, parquet, csv, or a hub dataset name)."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    suffix = p.suffix.lower()
    line_numbers: list[int] | None = None
    if p.exists():
        if suffix in (".jsonl", ".json"):
            builder = "json"
            if suffix == ".jsonl":
                numbered = list(iter_jsonl(p))  # parsed once; line numbers kept for error messages
                if not numbered:
                    raise DataError(f"{p}: no records")
                line_numbers = [lineno for lineno, _ in numbered]
        elif suffix == ".parquet":
            builder = "parquet"
        elif suffix == ".csv":
            builder = "csv"
        else:
            raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
        try:
            if builder == "json":
                # Our own parse (already validated line by line for JSONL) into a Dataset: the `json` builder's
                # pyarrow reader would turn ISO-date strings such as "2021-03-05" into timestamps.
                def where(i: int) -> str:  # record i as an error names it: file:line (JSONL), file[i] (JSON)
                    return f"{p}:{line_numbers[i]}" if line_numbers else f"{p}[{i}]"

                if suffix == ".jsonl":
                    rows = [obj for _, obj in numbered]
                else:
                    try:
                        rows = json.loads(read_text(p))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
                if isinstance(rows, dict) and "data" in rows:
                    rows = rows["data"]
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise DataError(f"{p}: a .json file must hold a list of records (JSON objects)")
                check_field_types(rows, where)
                ds = datasets.Dataset.from_list(rows)
            else:
                if builder == "parquet":  # checked first: datasets logs a traceback-sized error for a bad file
                    import pyarrow.parquet as pq

                    pq.read_metadata(p)
                ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except DataError:
            raise
        except Exception as e:  # datasets / pyarrow wrap parse errors in several types
            raise DataError(f"{p}: could not be read as {builder}: {e}") from None
        label = str(p)
    elif "/" in path and not path.startswith((".", "/")) and not suffix:
        ds = datasets.load_dataset(path, split=split)  # a hub dataset (online users)
        label = f"hub:{path}"
    else:
        raise DataError(f"data file not found: {path}")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    records = []
    for i, row in enumerate(ds):
        where = f"{label}:{line_numbers[i]}" if line_numbers else f"{label}[{i}]"
        records.append(Record(dict(row), where))
    return records
