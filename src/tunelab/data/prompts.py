"""Prompts for on-line RL: what the policy is asked, and the reference answer a verifier checks against.

`load_prompts(spec, data_cfg)` reads a recipe's `data.train` (or `data.eval`) as `PromptItem`s:

* a built-in task: its prompt, its answer, and the task name (so its own checker scores completions);
* a file (jsonl/json/parquet/csv) whose records have a prompt under one of PROMPT_KEYS (`prompt`, `question`,
  `instruction` (+ `input`), `problem`) or a `messages` list (the turns before the last assistant turn), and,
  optionally, a reference under one of ANSWER_KEYS (`answer`, `solution`, `completion`, `output`,
  `reference`): GSM8K's `{"question", "answer": "... #### 18"}` reads as it is.

A prompt without a reference is kept (`answer=None`): rewards that need one (verifiers) refuse such data
before training starts, naming the first record without one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import DataError, Record, _messages
from tunelab.data.pipeline import load_spec_records
from tunelab.recipe import DataConfig, DatasetSpec

PROMPT_KEYS = ("prompt", "question", "instruction", "problem")
ANSWER_KEYS = ("answer", "solution", "completion", "output", "reference")


@dataclass(frozen=True)
class PromptItem:
    messages: tuple  # chat messages up to the assistant turn to generate: ({"role", "content"}, ...)
    answer: str | None  # the reference a verifier compares with (None: the record has none)
    task: str | None = None  # built-in task whose checker applies (None: a file's record)
    origin: str = ""  # file:line or builtin:task/split[i], for error messages

    @property
    def text(self) -> str:
        """The last user message: what a reward function sees as `prompt`."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


def record_to_prompt(rec: Record, task: str | None, system_prompt: str | None) -> PromptItem:
    data = rec.data
    sys_msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    answer = next((data[k] for k in ANSWER_KEYS if data.get(k) is not None), None)
    if "messages" in data or "conversations" in data:
        msgs = _messages(rec, data.get("messages", data.get("conversations")), "messages")
        if msgs and msgs[-1]["role"] == "assistant":
            answer = answer if answer is not None else msgs[-1]["content"]
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{rec.origin}: no prompt turns before the assistant's")
        if not any(m["role"] == "system" for m in msgs):
            msgs = sys_msgs + msgs
    else:
        key = next((k for k in PROMPT_KEYS if data.get(k) is not None), None)
        if key is None:
            raise DataError(f"{rec.origin}: no prompt: a record needs one of {', '.join(PROMPT_KEYS)} or messages "
                            f"(has {sorted(data)})")
        value = data[key]
        if key == "instruction" and data.get("input"):
            value = f"{value}\n\n{data['input']}"
        msgs = sys_msgs + (_messages(rec, value, key) if not isinstance(value, str)
                           else [{"role": "user", "content": value}])
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return PromptItem(tuple(msgs), answer, task, rec.origin)


def load_prompts(spec: DatasetSpec, data_cfg: DataConfig) -> list[PromptItem]:
    """The prompts (and references) of a dataset spec; see the module docstring."""
    records = load_spec_records(spec)
    if not records:
        raise DataError(f"dataset {spec.builtin or spec.path}: no records")
    return [record_to_prompt(r, spec.builtin, data_cfg.system_prompt) for r in records]


def require_answers(items: list[PromptItem], why: str) -> None:
    """Raise a DataError naming the first prompt without a reference answer (`why`: who needs it)."""
    missing = [it for it in items if it.answer is None]
    if missing:
        raise DataError(f"{missing[0].origin}: no reference answer (one of {', '.join(ANSWER_KEYS)}), which {why} "
                        f"needs; {len(missing)} of {len(items)} prompts have none")
