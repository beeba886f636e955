"""Scoring a model on every task of the stream and on the general-ability files.

Tasks: greedy generation on each task's held-out items, scored by the built-in task's checker (user data:
normalised exact match against the reference), as `tunelab eval` does; plus the held-out loss of each task.
General ability: the evaluation suite's `ppl:` (bits per byte) and `mc:` (acc_norm) tasks
(tunelab.evaluate.suite.run_task). Everything is loaded and checked before the stream trains anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import DataError
from tunelab.data.pipeline import EvalItem, encode_spec, eval_items


class ContinualError(ValueError):
    """The stream cannot run as given (missing or malformed data, incompatible strategy); nothing was trained."""


@dataclass
class TaskData:
    name: str
    train: list[dict]  # encoded training examples
    eval_encoded: list[dict]  # encoded held-out examples (loss)
    items: list[EvalItem]  # held-out prompts + references (exact match)


def load_tasks(cr, tokenizer) -> list[TaskData]:
    """Load and encode every stage's data; the first problem stops everything, naming its stage."""
    out = []
    for i, st in enumerate(cr.stages):
        where = f"stage {i + 1} ({st.task_name!r})"
        data_cfg = cr.stage_recipe(i).data
        try:
            train, _ = encode_spec(tokenizer, st.train_spec(), data_cfg)
            ev, _ = encode_spec(tokenizer, st.eval_spec(), data_cfg)
            items = eval_items(st.eval_spec(), data_cfg)
        except (DataError, FileNotFoundError, KeyError, ValueError, OSError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ContinualError(f"{where}: {msg}") from None
        if not items:
            raise ContinualError(f"{where}: the eval data has no chat items with a reference answer to score")
        out.append(TaskData(st.task_name, train, ev, items[: st.eval_n]))
    return out


@dataclass
class GeneralTask:
    name: str  # e.g. "ppl:wikitext-2/test.txt"
    kind: str  # "ppl" | "mc"
    path: str


def load_general(cr) -> list[GeneralTask]:
    """Parse and read every general file now, so a bad one stops the stream before training."""
    from tunelab.evaluate.multiple_choice import load_mc_file
    from tunelab.evaluate.perplexity import load_text
    from tunelab.evaluate.suite import parse_spec

    out = []
    for kind, paths in (("ppl", cr.general.ppl), ("mc", cr.general.mc)):
        for j, path in enumerate(paths):
            try:
                name, _, _ = parse_spec(f"{kind}:{path}")
                if kind == "ppl":
                    load_text(path, cr.general.ppl_max_chars)
                else:
                    load_mc_file(path, cr.general.n)
            except (DataError, FileNotFoundError, ValueError, OSError) as e:
                raise ContinualError(f"general.{kind}.{j} ({path}): {e}") from None
            out.append(GeneralTask(name, kind, path))
    return out


def evaluate_model(model, tokenizer, tasks: list[TaskData], general: list[GeneralTask], cr, *, objective,
                   device, progress: bool = True) -> dict[str, Any]:
    """{"scores": {task: exact match}, "losses": {task: held-out loss}, "general": {name: suite result},
    "eval_time_s"}."""
    from tunelab.evaluate.suite import KINDS, SuiteSettings, run_task
    from tunelab.evaluate.tasks import exact_match
    from tunelab.train.loop import evaluate_loss

    t0 = time.perf_counter()
    ev, precision = cr.base.eval, cr.base.train.precision
    scores, losses, samples = {}, {}, {}
    for t in tasks:
        res = exact_match(model, tokenizer, t.items, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                          precision=precision, progress=progress)
        scores[t.name] = res["exact_match"]
        samples[t.name] = res["samples"][:3]
        losses[t.name] = evaluate_loss(model, objective, t.eval_encoded, batch_size=ev.batch_size,
                                       pad_id=tokenizer.pad_token_id, device=device, precision=precision)
    settings = SuiteSettings(n=cr.general.n, batch_size=ev.batch_size, precision=precision,
                             ppl_max_chars=cr.general.ppl_max_chars, progress=progress)
    gen: dict[str, Any] = {}
    for g in general:
        category, primary, higher = KINDS[g.kind]
        res = run_task(model, tokenizer, g.kind, g.path, settings)
        res.pop("samples", None)
        gen[g.name] = {"kind": g.kind, "category": category, "primary": primary, "higher_is_better": higher, **res}
    return {"scores": scores, "losses": losses, "general": gen, "samples": samples,
            "eval_time_s": time.perf_counter() - t0}
