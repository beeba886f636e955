"""From a DatasetSpec in a recipe to unified examples and encoded token ids."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.encode import EncodeStats, encode_examples
from tunelab.data.formats import DataError, Record, detect_format, load_records, to_example
from tunelab.recipe import DataConfig, DatasetSpec


@dataclass
class EvalItem:
    """A held-out item with a reference answer, for generation-based scoring."""

    messages: list[dict[str, str]]  # the conversation up to the assistant turn to generate
    answer: str
    task: str | None = None  # built-in task whose checker scores it (None: normalised exact match)


def builtin_records(spec: DatasetSpec) -> list[Record]:
    from tunelab.data.builtin import get_task
    from tunelab.data.builtin.base import generate, to_records

    if spec.split not in ("train", "eval"):
        raise DataError(f"built-in task {spec.builtin!r}: split must be 'train' or 'eval', got {spec.split!r}")
    try:
        task = get_task(spec.builtin)
    except KeyError as e:
        raise DataError(f"data.*.builtin: {e.args[0]}") from None
    items = generate(task, spec.split, spec.n or (2000 if spec.split == "train" else 200), spec.seed)
    return [Record(r, f"builtin:{spec.builtin}/{spec.split}[{i}]") for i, r in enumerate(to_records(items))]


def load_spec_records(spec: DatasetSpec) -> list[Record]:
    return builtin_records(spec) if spec.builtin else load_records(spec.path, spec.split, spec.n)


def records_to_examples(records: list[Record], spec: DatasetSpec, data_cfg: DataConfig) -> list:
    if not records:
        raise DataError(f"dataset {spec.builtin or spec.path}: no records")
    fmt = spec.format if spec.format != "auto" else detect_format(records[0].data, records[0].origin)
    return [to_example(r, fmt, data_cfg.system_prompt) for r in records]


def load_examples(spec: DatasetSpec, data_cfg: DataConfig) -> list:
    return records_to_examples(load_spec_records(spec), spec, data_cfg)


def encode_spec(tokenizer, spec: DatasetSpec, data_cfg: DataConfig) -> tuple[list[dict], EncodeStats]:
    examples = load_examples(spec, data_cfg)
    encoded, stats = encode_examples(tokenizer, examples, max_length=data_cfg.max_length,
                                     truncation=data_cfg.truncation, loss_mask=data_cfg.loss_mask,
                                     prompt_loss_weight=data_cfg.prompt_loss_weight)
    if not encoded:
        raise DataError(f"dataset {spec.builtin or spec.path}: nothing left after encoding ({stats.summary()})")
    return encoded, stats


def eval_items(spec: DatasetSpec, data_cfg: DataConfig) -> list[EvalItem]:
    """Held-out items for exact match: the prompt turns and the reference final answer.

    Chat examples: the turns before the last one, answer = the record's `answer` or the last turn.
    Preference pairs: the prompt turns, answer = the record's `answer` or the chosen response (so a
    preference task's eval split scores generations with the base task's checker).
    """
    from tunelab.data.formats import ChatExample, PreferenceExample

    records = load_spec_records(spec)
    items = []
    for rec, ex in zip(records, records_to_examples(records, spec, data_cfg)):
        if isinstance(ex, ChatExample):
            prompt, last = ex.messages[:-1], ex.messages[-1]["content"]
        elif isinstance(ex, PreferenceExample) and ex.prompt and len(ex.chosen) == 1:
            prompt, last = ex.prompt, ex.chosen[0]["content"]
        else:
            continue
        items.append(EvalItem(prompt, str(rec.data.get("answer", last)), spec.builtin))
    return items
