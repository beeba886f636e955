"""Built-in tasks: small procedural data sets with answer checkers.

``get_task(name)`` returns a task by name; ``generate(task, split, n, seed)`` gives
deterministic, train/eval-disjoint items. ``date_format`` is the quickstart task: the default
model fails it zero-shot and learns it with a few minutes of LoRA on a CPU. Every task with a corruption
table also has a preference variant ``<name>_pref`` (``date_format_pref``, ...: chosen = the reference
answer, rejected = a plausible mistake; see ``preference.py``), registered after the base tasks.
"""

from __future__ import annotations

from tunelab.data.builtin.acronym import AcronymTask
from tunelab.data.builtin.arithmetic import ArithmeticTask
from tunelab.data.builtin.base import BuiltinTask, TaskItem, generate, split_of, to_records
from tunelab.data.builtin.date_format import DateFormatTask
from tunelab.data.builtin.preference import PREFERENCE_TASKS
from tunelab.data.builtin.reverse_words import ReverseWordsTask
from tunelab.data.builtin.sort_numbers import SortNumbersTask

#: The task used by the quickstart recipe.
QUICKSTART_TASK = "date_format"

_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        DateFormatTask(),
        ArithmeticTask(),
        SortNumbersTask(),
        ReverseWordsTask(),
        AcronymTask(),
    )
}
_TASKS.update(PREFERENCE_TASKS)  # date_format_pref, arithmetic_pref, ...: after their base tasks


def get_task(name: str) -> BuiltinTask:
    """The built-in task called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        known = ", ".join(sorted(_TASKS))
        raise KeyError(f"unknown built-in task {name!r}; known tasks: {known}") from None


def list_tasks() -> list[BuiltinTask]:
    """All built-in tasks, in registration order."""
    return list(_TASKS.values())


__all__ = [
    "QUICKSTART_TASK",
    "BuiltinTask",
    "TaskItem",
    "generate",
    "get_task",
    "list_tasks",
    "split_of",
    "to_records",
]
