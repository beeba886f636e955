"""Models that stop: the export-time check of the ids generation stops on, and the stop-rate warning.

Three places name "the end" of a reply, and a model that never stops is usually one where they disagree:
`generation_config.eos_token_id` (what `generate`, vLLM and TGI stop on), the tokenizer's EOS token, and the
token the chat template closes an assistant turn with (what fine-tuning taught the model to emit: see
:mod:`tunelab.data.turns`). The check lists every disagreement; the fix adds the template's end-of-turn token
(and the tokenizer's EOS) to `generation_config.eos_token_id`, keeping the ids already there.

The stop rate (`tunelab.evaluate.tasks.exact_match`: the fraction of greedy generations that end with one of
those ids within `max_new_tokens`) is measured before and after training; :func:`stop_rate_warning` says when
it fell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.turns import as_id_list, end_of_turn

log = logging.getLogger(__name__)

STOP_RATE_TOLERANCE = 0.05  # a fall of more than 5 points of stop rate is reported


@dataclass
class StopCheck:
    generation_eos: list[int]
    tokenizer_eos: int | None
    template_eot: int | None
    problems: list[str] = field(default_factory=list)
    fixed_eos: list[int] | None = None  # the eos_token_id written, when the check changed it

    def as_dict(self) -> dict:
        return {"generation_eos": self.generation_eos, "tokenizer_eos": self.tokenizer_eos,
                "template_end_of_turn": self.template_eot, "problems": self.problems, "fixed_eos": self.fixed_eos}


def check_stop_tokens(tokenizer, generation_config) -> StopCheck:
    """Compare the generation config's EOS ids, the tokenizer's EOS and the template's end-of-turn token."""
    gen = as_id_list(getattr(generation_config, "eos_token_id", None))
    eot = end_of_turn(tokenizer)
    eot_id = eot.token_id if eot is not None else None
    tok_eos = tokenizer.eos_token_id
    check = StopCheck(gen, tok_eos, eot_id)

    def name(i: int) -> str:
        return f"{i} ({tokenizer.convert_ids_to_tokens(i)!r})"

    if eot is not None and eot_id is None:
        check.problems.append(f"the chat template ends an assistant turn with {eot.suffix!r}, which holds no special "
                              "token: generation can only stop on max_new_tokens or the EOS token")
    if eot_id is not None and eot_id not in gen:
        check.problems.append(f"the chat template's end-of-turn token {name(eot_id)} is not in "
                              f"generation_config.eos_token_id {gen}")
    if tok_eos is not None and tok_eos not in gen:
        check.problems.append(f"the tokenizer's EOS token {name(tok_eos)} is not in generation_config.eos_token_id "
                              f"{gen}")
    if eot_id is not None and tok_eos is not None and eot_id != tok_eos:
        check.problems.append(f"the tokenizer's EOS token {name(tok_eos)} is not the template's end-of-turn token "
                              f"{name(eot_id)} (fine when both are stop ids)")
    return check


def fix_generation_config(model_dir: str | Path, tokenizer, *, echo=log.warning) -> StopCheck:
    """Check the HF checkpoint in `model_dir` and, when the template's end-of-turn token or the tokenizer's EOS
    is missing from its generation config, add them (generation_config.json rewritten). Problems are echoed."""
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: start from config.json's ids
        gen = GenerationConfig.from_model_config(_model_config(model_dir))
    check = check_stop_tokens(tokenizer, gen)
    wanted = list(dict.fromkeys([*check.generation_eos, *(i for i in (check.template_eot, check.tokenizer_eos)
                                                          if i is not None)]))
    if wanted != check.generation_eos:
        gen.eos_token_id = wanted[0] if len(wanted) == 1 else wanted
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
        gen.save_pretrained(model_dir)
        check.fixed_eos = wanted
    for p in check.problems:
        echo(f"stop tokens: {p}")
    if check.fixed_eos is not None:
        echo(f"stop tokens: generation_config.eos_token_id set to {check.fixed_eos} in {model_dir}")
    return check


def _model_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def stop_rate_warning(before: dict | None, after: dict | None, tolerance: float = STOP_RATE_TOLERANCE) -> str | None:
    """A loud message when the stop rate fell by more than `tolerance` from `before` to `after` (eval dicts)."""
    b, a = (before or {}).get("stop_rate"), (after or {}).get("stop_rate")
    if b is None or a is None or a >= b - tolerance:
        return None
    return (f"WARNING: the trained model stops less often: stop rate {100 * b:.1f}% before training, {100 * a:.1f}% "
            "after (generations that end with an end-of-turn / EOS token within eval.max_new_tokens). It may "
            "ramble past its answer: check that the training data's responses end with the chat template's "
            "end-of-turn token and that the loss covers it (data.loss_mask).")
