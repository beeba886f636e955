"""Tests for the built-in tasks: generation, splits, checkers and the registry (no model load)."""

from __future__ import annotations

import random

import pytest

from tunelab.data.builtin import QUICKSTART_TASK, get_task, list_tasks
from tunelab.data.builtin.base import BuiltinTask, TaskItem, generate, split_of, to_records

TASK_NAMES = [t.name for t in list_tasks()]


# --- registry -------------------------------------------------------------------------------


def test_at_least_three_tasks_with_distinct_skills() -> None:
    tasks = list_tasks()
    assert len(tasks) >= 3
    assert len({t.skill for t in tasks}) == len(tasks)
    assert len(set(TASK_NAMES)) == len(TASK_NAMES)


def test_tasks_have_metadata() -> None:
    for task in list_tasks():
        assert isinstance(task, BuiltinTask)
        assert task.name and task.skill and task.description


@pytest.mark.parametrize("name", TASK_NAMES)
def test_get_task_returns_named_task(name: str) -> None:
    assert get_task(name).name == name


def test_quickstart_task_is_registered() -> None:
    assert get_task(QUICKSTART_TASK).name == "date_format"


def test_unknown_task_raises_keyerror_listing_known_names() -> None:
    with pytest.raises(KeyError) as err:
        get_task("no_such_task")
    message = str(err.value)
    assert "no_such_task" in message
    for name in TASK_NAMES:
        assert name in message


# --- generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_generate_is_deterministic(name: str, split: str) -> None:
    task = get_task(name)
    assert generate(task, split, 50, seed=3) == generate(task, split, 50, seed=3)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_larger_n_extends_smaller_n(name: str) -> None:
    task = get_task(name)
    assert generate(task, "eval", 80, seed=2)[:30] == generate(task, "eval", 30, seed=2)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generate_depends_on_seed(name: str) -> None:
    task = get_task(name)
    assert generate(task, "train", 20, seed=0) != generate(task, "train", 20, seed=1)


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("n", [0, 1, 37, 200])
def test_generate_honours_n_without_duplicates(name: str, n: int) -> None:
    items = generate(get_task(name), "train", n)
    assert len(items) == n
    assert len({it.prompt for it in items}) == n
    assert all(isinstance(it, TaskItem) and it.prompt and it.answer for it in items)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_for_any_seeds(name: str) -> None:
    task = get_task(name)
    train = {it.prompt for seed in (0, 1, 2) for it in generate(task, "train", 300, seed=seed)}
    evals = {it.prompt for seed in (0, 1, 7) for it in generate(task, "eval", 100, seed=seed)}
    assert train.isdisjoint(evals)
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "eval" for p in evals)


def test_split_of_is_stable() -> None:
    # Fixed by sha256, so it must not change between runs or Python processes.
    prompts = [f"prompt {i}" for i in range(200)]
    assert [split_of(p) for p in prompts] == [split_of(p) for p in prompts]
    n_eval = sum(split_of(p) == "eval" for p in prompts)
    assert 5 <= n_eval <= 40  # about 1 in 10


def test_generate_rejects_bad_arguments() -> None:
    task = get_task(QUICKSTART_TASK)
    with pytest.raises(ValueError, match="split"):
        generate(task, "test", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        generate(task, "train", -1)


class _TinyTask(BuiltinTask):
    """Five possible prompts only, to exercise the pool-too-small error."""

    name = "tiny"
    skill = "nothing"
    description = "A pool of five prompts."

    def sample(self, rng: random.Random) -> TaskItem:
        k = rng.randint(1, 5)
        return TaskItem(prompt=f"say {k}", answer=str(k))


def test_generate_raises_when_pool_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        generate(_TinyTask(), "train", 100)


def test_tiny_pool_can_still_be_exhausted_exactly() -> None:
    n_train = sum(split_of(f"say {k}") == "train" for k in range(1, 6))
    items = generate(_TinyTask(), "train", n_train)
    assert sorted(it.prompt for it in items) == sorted(
        f"say {k}" for k in range(1, 6) if split_of(f"say {k}") == "train"
    )


def test_to_records() -> None:
    items = [TaskItem(prompt="p1", answer="a1"), TaskItem(prompt="p2", answer="a2")]
    assert to_records(items) == [
        {"prompt": "p1", "completion": "a1", "answer": "a1"},
        {"prompt": "p2", "completion": "a2", "answer": "a2"},
    ]


# --- checkers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_checker_accepts_reference_answers(name: str) -> None:
    task = get_task(name)
    for it in generate(task, "eval", 50):
        assert task.check(it.answer, it.answer)
        assert task.check(f"  {it.answer}\n", it.answer)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_checker_rejects_empty_and_verbose_answers(name: str) -> None:
    task = get_task(name)
    for it in generate(task, "eval", 20):
        assert not task.check("", it.answer)
        assert not task.check(f"The answer is {it.answer}", it.answer)


CHECK_CASES = {
    "date_format": [
        ("2021-03-05", "2021-03-05", True),
        (" 2021-03-05 ", "2021-03-05", True),
        ("2021-3-5", "2021-03-05", False),
        ("2021-05-03", "2021-03-05", False),
        ("05/03/2021", "2021-03-05", False),
        ("2021-03-05.", "2021-03-05", False),
    ],
    "arithmetic": [
        ("85", "85", True),
        (" 85\n", "85", True),
        ("-39", "-39", True),
        ("39", "-39", False),
        ("86", "85", False),
        ("85.", "85", False),
        ("47 + 38 = 85", "85", False),
    ],
    "sort_numbers": [
        ("7, 19, 42, 88", "7, 19, 42, 88", True),
        ("7,19,42,88", "7, 19, 42, 88", True),
        ("7, 19, 88, 42", "7, 19, 42, 88", False),
        ("7, 19, 42", "7, 19, 42, 88", False),
        ("7 19 42 88", "7, 19, 42, 88", False),
        ("7, 19, 42, 88.", "7, 19, 42, 88", False),
    ],
    "reverse_words": [
        ("stone river apple", "stone river apple", True),
        ("stone  river\napple", "stone river apple", True),
        ("apple river stone", "stone river apple", False),
        ("stone, river, apple", "stone river apple", False),
        ("Stone River Apple", "stone river apple", False),
    ],
    "acronym": [
        ("RGL", "RGL", True),
        (" RGL ", "RGL", True),
        ("rgl", "RGL", False),
        ("R.G.L.", "RGL", False),
        ("RLG", "RGL", False),
    ],
}


# a preference variant scores generations with its base task's checker: the same cases apply
CHECK_CASES.update({f"{name}_pref": cases for name, cases in list(CHECK_CASES.items())})


def test_every_task_has_hand_written_check_cases() -> None:
    assert set(CHECK_CASES) == set(TASK_NAMES)


@pytest.mark.parametrize(
    ("name", "prediction", "answer", "expected"),
    [(name, *case) for name, cases in CHECK_CASES.items() for case in cases],
)
def test_checker_cases(name: str, prediction: str, answer: str, expected: bool) -> None:
    assert get_task(name).check(prediction, answer) is expected


# --- task content -----------------------------------------------------------------------------


def test_date_format_answers_are_valid_iso_dates() -> None:
    import datetime

    for it in generate(get_task("date_format"), "train", 200):
        parsed = datetime.date.fromisoformat(it.answer)
        assert parsed.strftime("%B") in it.prompt
        assert str(parsed.year) in it.prompt


def test_arithmetic_answers_are_correct() -> None:
    for it in generate(get_task("arithmetic"), "train", 200):
        expr = it.prompt.removeprefix("What is ").split("?")[0]
        a, op, b = expr.split()
        assert int(it.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_sort_numbers_answers_are_sorted_permutations() -> None:
    for it in generate(get_task("sort_numbers"), "train", 200):
        shown = it.prompt.split(": ", 1)[1].split(".")[0]
        given = [int(x) for x in shown.split(", ")]
        assert [int(x) for x in it.answer.split(", ")] == sorted(given)


def test_reverse_words_and_acronym_answers() -> None:
    for it in generate(get_task("reverse_words"), "train", 100):
        words = it.prompt.split(": ", 1)[1].split(".")[0].split()
        assert it.answer.split() == words[::-1]
    for it in generate(get_task("acronym"), "train", 100):
        words = it.prompt.split("'")[1].split()
        assert it.answer == "".join(w[0].upper() for w in words)
