"""Core types for the built-in tasks: items, the task base class and the split-aware generator.

A built-in task is a tiny procedural data set: ``sample`` draws one random (prompt, answer)
pair and ``check`` decides whether a model's output counts as correct. ``generate`` turns a
task into a deterministic list of items for the "train" or "eval" split. The two splits are
disjoint by construction: whether an item belongs to "eval" is a pure function of its prompt
(a stable hash falling in a fixed 1-in-``EVAL_BUCKETS`` bucket), so no seed, ``n`` or call
order can ever leak an eval prompt into training data.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "eval"]

#: An item belongs to "eval" iff ``hash(prompt) % EVAL_BUCKETS == 0`` (about 1 in 10 prompts).
EVAL_BUCKETS = 10

#: ``generate`` gives up after this many consecutive draws that yield no new item of the split.
MAX_CONSECUTIVE_MISSES = 10_000

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class TaskItem:
    """One example of a task."""

    prompt: str  #: the user message
    answer: str  #: the reference completion, exactly what a perfect model outputs


def normalize(text: str) -> str:
    """Strip the ends and collapse inner runs of whitespace to one space."""
    return _WHITESPACE.sub(" ", text.strip())


class BuiltinTask(ABC):
    """A procedurally generated task with an answer checker.

    Subclasses set the class attributes ``name`` (registry key), ``skill`` (one short
    phrase naming what is measured) and ``description``, and implement ``sample``.
    """

    name: str
    skill: str
    description: str

    @abstractmethod
    def sample(self, rng: random.Random) -> TaskItem:
        """Draw one random item using only ``rng`` (so generation is reproducible)."""

    def check(self, prediction: str, answer: str) -> bool:
        """Whether ``prediction`` is a correct output for reference ``answer``.

        Default: exact match after whitespace normalisation. Tasks may override it
        (e.g. compare numbers numerically) but should stay strict about the format
        the prompt asks for, since following that format is part of the skill.
        """
        return normalize(prediction) == normalize(answer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, skill={self.skill!r})"


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from a stable (process-independent) hash."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else "train"


def generate(task: BuiltinTask, split: Split, n: int, seed: int = 0) -> list[TaskItem]:
    """Generate ``n`` distinct items of ``task`` belonging to ``split``.

    Deterministic for ``(task.name, split, n, seed)``; a larger ``n`` extends a smaller one
    (the first items are the same). Items whose prompt hashes to the other split are
    rejected, as are repeated prompts. Raises ``ValueError`` when the task cannot supply
    ``n`` distinct prompts for the split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task.name}:{split}:{seed}")
    items: list[TaskItem] = []
    seen: set[str] = set()
    misses = 0
    while len(items) < n:
        item = task.sample(rng)
        if item.prompt in seen or split_of(item.prompt) != split:
            misses += 1
            if misses >= MAX_CONSECUTIVE_MISSES:
                raise ValueError(
                    f"task {task.name!r} could only produce {len(items)} distinct {split!r} items "
                    f"(requested {n}): its pool of prompts is too small for this request"
                )
            continue
        misses = 0
        seen.add(item.prompt)
        items.append(item)
    return items


def to_records(items: list[TaskItem]) -> list[dict]:
    """Records for the data pipeline (``answer`` kept for the checker): prompt/completion records, or the
    item's own record where it has one (preference items: ``{"prompt", "chosen", "rejected", "answer"}``)."""
    return [it.to_record() if hasattr(it, "to_record")
            else {"prompt": it.prompt, "completion": it.answer, "answer": it.answer} for it in items]
