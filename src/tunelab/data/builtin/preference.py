"""Preference variants of the built-in tasks: chosen = the correct answer, rejected = a plausible wrong one.

``date_format_pref`` is ``date_format`` with, for every prompt, the reference date as the chosen
response and one of the mistakes a small chat model actually makes as the rejected one: a date off by
one day or one month, month and day swapped, the zero padding forgotten, the fields in the wrong order,
or the right date wrapped in a sentence. The other tasks get the same treatment (``arithmetic_pref``:
off by one or ten, the sign flipped, a sentence; ``sort_numbers_pref``, ``reverse_words_pref``,
``acronym_pref``: a neighbour swap, a dropped element, the input order, the wrong case).

Every rejected response differs from the chosen one and fails the base task's checker (asserted at
generation). The prompts, and therefore the train/eval split of every prompt, are those of the base
task (``split_of`` hashes the prompt), so ``date_format_pref`` eval prompts never occur in
``date_format`` training data either. Records: ``{"prompt", "chosen", "rejected", "answer"}``; ``check``
is the base task's, so exact match on a preference eval split scores generations like the base task.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from dataclasses import dataclass
from typing import Callable

from tunelab.data.builtin.acronym import AcronymTask
from tunelab.data.builtin.arithmetic import ArithmeticTask
from tunelab.data.builtin.base import BuiltinTask, TaskItem, normalize, to_records
from tunelab.data.builtin.date_format import DateFormatTask
from tunelab.data.builtin.reverse_words import ReverseWordsTask
from tunelab.data.builtin.sort_numbers import SortNumbersTask

#: A corruption maps (reference answer, prompt, rng) to a wrong answer, or None where it does not apply.
Corruption = Callable[[str, str, random.Random], "str | None"]


@dataclass(frozen=True)
class PreferenceItem(TaskItem):
    """A task item with a rejected (wrong) response; ``answer`` is the chosen one."""

    rejected: str = ""
    kind: str = ""  #: name of the corruption that produced ``rejected``

    def to_record(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.answer, "rejected": self.rejected, "answer": self.answer}


def to_preference_records(items: list[TaskItem]) -> list[dict]:
    """Records for the data pipeline: preference records for ``PreferenceItem``s, prompt/completion otherwise
    (the same as ``base.to_records``, which the pipeline uses)."""
    return to_records(items)


class PreferenceTask(BuiltinTask):
    """``base`` with a rejected response drawn from ``corruptions`` (uniformly among those that apply)."""

    def __init__(self, base: BuiltinTask, corruptions: dict[str, Corruption]):
        self.base = base
        self.corruptions = corruptions
        self.name = f"{base.name}_pref"
        self.skill = f"{base.skill} (preference pairs)"
        self.description = f"{base.description} Pairs: the correct answer vs a plausible wrong one."

    def sample(self, rng: random.Random) -> PreferenceItem:
        item = self.base.sample(rng)
        kinds = list(self.corruptions)
        rng.shuffle(kinds)
        for kind in kinds:
            wrong = self.corruptions[kind](item.answer, item.prompt, rng)
            if wrong is None or normalize(wrong) == normalize(item.answer) or self.base.check(wrong, item.answer):
                continue
            return PreferenceItem(prompt=item.prompt, answer=item.answer, rejected=wrong, kind=kind)
        raise RuntimeError(f"{self.name}: no corruption applies to {item.answer!r}")  # a bug in the table

    def check(self, prediction: str, answer: str) -> bool:
        return self.base.check(prediction, answer)


# -- date_format ---------------------------------------------------------------------------------


def _date(answer: str) -> dt.date:
    return dt.date.fromisoformat(answer)


def _date_day_off(answer, prompt, rng):
    return (_date(answer) + dt.timedelta(days=rng.choice((-1, 1)))).isoformat()


def _date_month_off(answer, prompt, rng):
    d = _date(answer)
    month = d.month % 12 + 1 if rng.random() < 0.5 else (d.month - 2) % 12 + 1
    return dt.date(d.year, month, min(d.day, calendar.monthrange(d.year, month)[1])).isoformat()


def _date_swapped(answer, prompt, rng):
    d = _date(answer)
    return f"{d.year:04d}-{d.day:02d}-{d.month:02d}" if d.day <= 12 and d.day != d.month else None


def _date_unpadded(answer, prompt, rng):
    d = _date(answer)
    return f"{d.year}-{d.month}-{d.day}" if d.month < 10 or d.day < 10 else None


def _date_day_first(answer, prompt, rng):
    d = _date(answer)
    return f"{d.day:02d}-{d.month:02d}-{d.year:04d}"


def _sentence(answer, prompt, rng):
    return rng.choice(("The date is {}.", "Sure! {}", "{} is the answer.")).format(answer)


DATE_CORRUPTIONS: dict[str, Corruption] = {
    "day_off_by_one": _date_day_off,
    "month_off_by_one": _date_month_off,
    "month_day_swapped": _date_swapped,
    "no_zero_padding": _date_unpadded,
    "day_first": _date_day_first,
    "sentence": _sentence,
}


# -- arithmetic ----------------------------------------------------------------------------------


def _num_off(delta: tuple[int, ...]) -> Corruption:
    return lambda answer, prompt, rng: str(int(answer) + rng.choice(delta))


def _num_sign(answer, prompt, rng):
    return str(-int(answer)) if int(answer) != 0 else None


def _num_sentence(answer, prompt, rng):
    return rng.choice(("The answer is {}.", "{} (I think)", "Result: {}")).format(answer)


ARITHMETIC_CORRUPTIONS: dict[str, Corruption] = {
    "off_by_one": _num_off((-1, 1)),
    "carry_error": _num_off((-10, 10)),
    "sign_flipped": _num_sign,
    "sentence": _num_sentence,
}


# -- list-like answers (sort_numbers, reverse_words, acronym) -----------------------------------------


def _items(answer: str, sep: str) -> list[str]:
    return answer.split(sep) if sep else list(answer)


def _swap_neighbours(sep: str) -> Corruption:
    def corrupt(answer, prompt, rng):
        xs = _items(answer, sep)
        if len(xs) < 2:
            return None
        i = rng.randrange(len(xs) - 1)
        xs[i], xs[i + 1] = xs[i + 1], xs[i]
        return sep.join(xs)

    return corrupt


def _drop_one(sep: str) -> Corruption:
    def corrupt(answer, prompt, rng):
        xs = _items(answer, sep)
        if len(xs) < 2:
            return None
        del xs[rng.randrange(len(xs))]
        return sep.join(xs)

    return corrupt


def _reversed(sep: str) -> Corruption:
    return lambda answer, prompt, rng: sep.join(reversed(_items(answer, sep)))


LIST_CORRUPTIONS = {
    "sort_numbers": {"neighbours_swapped": _swap_neighbours(", "), "one_dropped": _drop_one(", "),
                     "descending": _reversed(", ")},
    "reverse_words": {"neighbours_swapped": _swap_neighbours(" "), "one_dropped": _drop_one(" "),
                      "input_order": _reversed(" ")},
    "acronym": {"letters_swapped": _swap_neighbours(""), "letter_dropped": _drop_one(""),
                "lower_case": lambda answer, prompt, rng: answer.lower()},
}


def preference_variants(tasks) -> list[PreferenceTask]:
    """A preference variant of every task in ``tasks`` that has a corruption table (by task name)."""
    tables = {"date_format": DATE_CORRUPTIONS, "arithmetic": ARITHMETIC_CORRUPTIONS, **LIST_CORRUPTIONS}
    return [PreferenceTask(t, tables[t.name]) for t in tasks if t.name in tables]


#: The preference tasks by name (``date_format_pref``, ``arithmetic_pref``, ...).
PREFERENCE_TASKS: dict[str, PreferenceTask] = {
    t.name: t
    for t in preference_variants(
        (DateFormatTask(), ArithmeticTask(), SortNumbersTask(), ReverseWordsTask(), AcronymTask())
    )
}


__all__ = [
    "PreferenceItem",
    "PreferenceTask",
    "PREFERENCE_TASKS",
    "DATE_CORRUPTIONS",
    "ARITHMETIC_CORRUPTIONS",
    "preference_variants",
    "to_preference_records",
]
