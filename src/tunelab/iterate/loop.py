"""`run_iterate`: self-improvement rounds (docs/iterate.md). Each round:

  1. generate: the latest model answers the round's prompts `num_generations` times (tunelab.generate), the
     rewards score every answer (STaR: wrong prompts asked again with a hint)  -> round-N/samples.jsonl
  2. build: keep or pair by the strategy's rule (iterate/select.py)            -> round-N/data.jsonl
  3. train: an ordinary run (`tunelab.runner.run_recipe`) of the recipe on data.jsonl, starting from the previous
     round's model or the base (`continue_from`); its evaluation is the round's  -> round-N/run/
  4. record: the round's row                                                    -> round-N/round.json, round-N/DONE

Run directory:
  recipe.yaml                  the iterate recipe as written (`tunelab iterate RUN_DIR` resumes from it)
  round-N/samples.jsonl        per prompt: chat, reference, completions, each reward's scores, weighted reward,
                               verifier verdict (STaR: which were rationalized)
  round-N/samples.json         the round's sampling statistics (mean reward, sample accuracy, pass@k, times)
  round-N/data.jsonl           SFT records (`messages`) or preference pairs (`prompt`, `chosen`, `rejected`):
                               `tunelab run` trains on it as it is (data.train.path)
  round-N/run/                 the round's training run: metrics.jsonl, eval_*.json, checkpoints/, export/merged
  round-N/round.json, DONE     the round's row; DONE marks a finished round, never recomputed on resume
  metrics.jsonl                every round's training metrics, `round` added, steps numbered across rounds
  summary.json                 the per-round table, before/after of the whole loop, the final model

Every file is written atomically. Resume (`--resume` or the run directory as the argument): finished rounds are
read back; an unfinished one reuses its samples and data if they were written, and its run resumes from its last
checkpoint (the runner's resume).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.core.io import atomic_write_json, atomic_write_text
from tunelab.core.rundir import keep_run_dir, lock_run_dir, new_run_dir
from tunelab.data.prompts import PromptItem, load_prompts
from tunelab.iterate.rounds import ROUND_COLUMNS, format_rounds, round_row
from tunelab.iterate.sampling import group_from_json, group_to_json, sample_round
from tunelab.iterate.select import (
    best_vs_worst,
    human_vs_generated,
    judge_agreement,
    pair_record,
    select_samples,
    sft_record,
)
from tunelab.model import load_model, load_tokenizer
from tunelab.recipe import DatasetSpec, ModelConfig, Recipe, RecipeError, recipe_to_yaml
from tunelab.rewards.scoring import RewardSet
from tunelab.runner import resolve_run_precision, run_recipe
from tunelab.validate import check_iterate_prompts, validate_recipe

log = logging.getLogger("tunelab")

DONE = "DONE"


class IterateError(RecipeError):
    """An iterate run that cannot go on as asked (the message says why and what to change)."""


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def round_prompts(prompts: list[PromptItem], per_round: int | None, r: int, seed: int) -> list[PromptItem]:
    """Round r's prompts (1-based): consecutive slices of one seeded shuffle, wrapping around; all if per_round
    is None."""
    if per_round is None or per_round >= len(prompts):
        return list(prompts)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (r - 1) * per_round
    return [prompts[order[(start + k) % len(order)]] for k in range(per_round)]


def build_round_data(groups, recipe: Recipe) -> tuple[list[dict], dict[str, Any]]:
    """The round's training records and what was kept (see iterate/select.py for the rules)."""
    it = recipe.iterate
    assert it is not None
    info: dict[str, Any] = {"rule": it.rule}
    if it.rule == "best_vs_worst":
        pairs = best_vs_worst(groups)
        rows = [pair_record(groups[i], groups[i].completions[c], groups[i].completions[r]) for i, c, r in pairs]
        info["pairs"] = len(rows)
    elif it.rule == "human_vs_generated":
        picked = human_vs_generated(groups)
        rows = [pair_record(groups[i], groups[i].answer, groups[i].completions[j]) for i, j in picked]
        info["pairs"] = len(rows)
    else:
        picked = select_samples(groups, it.rule, threshold=it.threshold, top_fraction=it.top_fraction,
                                min_reward=it.min_reward, max_per_prompt=it.max_per_prompt)
        rows = [sft_record(groups[i], j) for i, j in picked]
        info["rationalized_kept"] = sum(groups[i].rationalized[j] for i, j in picked)
        info["prompts_kept"] = len({i for i, _ in picked})
    info["kept"] = len(rows)
    if it.strategy == "self_rewarding":
        judge = next(s.name for s in it.rewards if s.name == "judge")
        info.update(judge_agreement(groups, judge))
        info["chosen_correct"] = _chosen_correct(groups, best_vs_worst(groups))
    return rows, info


def _chosen_correct(groups, pairs) -> float | None:
    """Share of the judge-built pairs whose chosen answer the verifier accepts (None without a verifier)."""
    verdicts = [groups[i].correct[c] for i, c, _ in pairs if groups[i].correct[c] is not None]
    return sum(v >= 1.0 for v in verdicts) / len(verdicts) if verdicts else None


class Rounds:
    """One iterate run; `run()` does the whole of it."""

    def __init__(self, recipe: Recipe, run_dir: Path, prompts: list[PromptItem], *, resume: bool):
        self.asked, self.run_dir, self.prompts, self.resume = recipe, run_dir, prompts, resume
        self.recipe, self.why = resolve_run_precision(recipe)
        self.it = recipe.iterate
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(recipe.model)

    def rdir(self, r: int) -> Path:
        return self.run_dir / f"round-{r}"

    def model_dir(self, r: int) -> Path:
        return self.rdir(r) / "run" / "export" / "merged"

    def model_config(self, path: Path | None) -> ModelConfig:
        """The base (None) or a round's merged model, loaded as the base recipe's model settings say."""
        if path is None:
            return self.recipe.model
        return self.recipe.model.model_copy(update={"name_or_path": str(path), "gguf_file": None, "revision": None})

    # -- one round ---------------------------------------------------------------------------------------------
    def generate(self, r: int, latest: Path | None) -> tuple[list, dict[str, Any]]:
        """round-N/samples.jsonl and samples.json: read back if written, else generated and scored."""
        d = self.rdir(r)
        if (d / "samples.jsonl").is_file() and (d / "samples.json").is_file():
            print(f"round {r}: samples read back from {d / 'samples.jsonl'}")
            return [group_from_json(x) for x in _read_jsonl(d / "samples.jsonl")], \
                json.loads((d / "samples.json").read_text())
        items = round_prompts(self.prompts, self.it.prompts_per_round, r, self.it.seed)
        print(f"\nround {r}/{self.it.rounds}: sampling {len(items)} prompts x {self.it.num_generations} with "
              f"{'the base model' if latest is None else latest}")
        model = load_model(self.model_config(latest)).to(self.device).eval()
        precision = self.recipe.train.precision
        rewards = RewardSet.from_specs(self.it.rewards, tokenizer=self.tokenizer, precision=precision,
                                       device=self.device, policy=lambda m=model: m) if self.it.rewards else None
        # (the judge's `model: policy` scores with the model that sampled)
        out = sample_round(model, self.tokenizer, items, self.it, rewards, seed=self.it.seed + r, precision=precision)
        del model, rewards
        gc.collect()
        out.stats["sampled_with"] = str(latest) if latest is not None else "base"
        d.mkdir(parents=True, exist_ok=True)
        _write_jsonl(d / "samples.jsonl", [group_to_json(g) for g in out.groups])
        atomic_write_json(d / "samples.json", out.stats)
        keep_run_dir(self.run_dir)  # generated samples are work to keep, even before any training step
        return out.groups, out.stats

    def round_recipe(self, r: int, start: Path | None, data_path: Path) -> Recipe:
        """The recipe of round r's training run: the base recipe on data.jsonl, from `start`, evaluated after
        (and, in round 1, before) training; the merged model exported (the next round samples from it)."""
        base = self.asked
        fmt = "preference" if self.it.builds_pairs else "messages"
        data = base.data.model_copy(update={"train": DatasetSpec(path=str(data_path), format=fmt), "select": None})
        ev = base.eval.model_copy(update={"before": base.eval.before and r == 1})
        last = r == self.it.rounds
        ex = base.export.model_copy(update={"merged": True, "gguf": list(base.export.gguf) if last else []})
        return base.model_copy(update={"name": f"round-{r}", "model": self.model_config(start), "data": data,
                                       "eval": ev, "export": ex, "iterate": None})

    def train(self, r: int, start: Path | None) -> dict[str, Any]:
        d = self.rdir(r)
        run = d / "run"
        resume = (run / "recipe.yaml").is_file()
        run.mkdir(parents=True, exist_ok=True)
        recipe = self.round_recipe(r, start, d / "data.jsonl")
        print(f"round {r}: training from {'the base model' if start is None else start}"
              f"{' (resuming)' if resume else ''}")
        return run_recipe(recipe, run_dir=run, resume=resume)

    def run_round(self, r: int, latest: Path | None) -> dict[str, Any]:
        d = self.rdir(r)
        t0 = time.perf_counter()
        groups, stats = self.generate(r, latest)
        rows, info = build_round_data(groups, self.recipe)
        base_row = {"round": r, "samples": stats, "data": info}
        if not rows:
            what = "pairs" if self.it.builds_pairs else "samples"
            msg = (f"round {r}: kept no {what} ({info['rule']} over {stats['completions']} completions of "
                   f"{stats['prompts']} prompts; mean reward {_fmt(stats.get('mean_reward'))})")
            status = "stopped" if self.it.on_empty_round == "stop" else "skipped"
            print(f"{msg}: {'stopping (iterate.on_empty_round: stop)' if status == 'stopped' else 'skipping its training (iterate.on_empty_round: skip)'}")  # noqa: E501
            row = {**base_row, "status": status, "message": msg, "model": str(latest) if latest else None,
                   "round_time_s": stats.get("sampling_s", 0.0)}
            self.finish_round(r, row)
            return row
        if not (d / "data.jsonl").is_file():
            _write_jsonl(d / "data.jsonl", rows)
        print(f"round {r}: kept {len(rows)} {'pairs' if self.it.builds_pairs else 'samples'} ({info['rule']}) -> "
              f"{d / 'data.jsonl'}")
        start = latest if self.it.start_from == "previous" else None
        summary = self.train(r, start)
        self.append_metrics(r)
        row = {**base_row, "status": "trained", "model": str(self.model_dir(r)), "started_from": str(start) if start
               else "base", "train": {k: summary.get(k) for k in ("steps", "final_train_loss", "train_time_s")},
               "before": summary.get("before") or {}, "after": summary.get("after") or {},
               "round_time_s": stats.get("sampling_s", 0.0) + summary.get("wall_time_s", 0.0)}
        if self.resume:
            row["resumed_in_this_process_s"] = time.perf_counter() - t0
        self.finish_round(r, row)
        return row

    def finish_round(self, r: int, row: dict[str, Any]) -> None:
        d = self.rdir(r)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "round.json", row)
        atomic_write_text(d / DONE, "")

    def append_metrics(self, r: int) -> None:
        """The round's training metrics into the top-level metrics.jsonl (round added, steps across rounds)."""
        path = self.run_dir / "metrics.jsonl"
        kept = [m for m in _read_jsonl(path) if m.get("round", 0) < r] if path.is_file() else []
        offset = max((m["step"] for m in kept if "step" in m), default=0)
        src = self.rdir(r) / "run" / "metrics.jsonl"
        lines = _read_jsonl(src) if src.is_file() else []
        kept += [{**m, "round": r, "round_step": m.get("step"), "step": offset + m.get("step", 0)} for m in lines]
        _write_jsonl(path, kept)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        print(f"iterate: {self.it.strategy}, {self.it.rounds} rounds, run directory {self.run_dir}")
        print(f"precision: {self.recipe.train.precision} ({self.why})")
        rows: list[dict[str, Any]] = []
        latest: Path | None = None  # the model the next round samples from (None: the base)
        for r in range(1, self.it.rounds + 1):
            d = self.rdir(r)
            if (d / DONE).is_file():
                row = json.loads((d / "round.json").read_text())
                print(f"round {r}: done ({row['status']}), read back")
            else:
                row = self.run_round(r, latest)
            rows.append(row)
            if row["status"] == "trained":
                latest = Path(row["model"])
            if row["status"] == "stopped":
                break
        return self.summarize(rows, time.perf_counter() - t_start)

    def summarize(self, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        table = [round_row(row) for row in rows]
        first = next((row for row in rows if row.get("before")), None)
        trained = [row for row in rows if row["status"] == "trained"]
        base = round_row({"round": 0, "status": "base", "after": first["before"]}) if first else None
        summary = {
            "run_dir": str(self.run_dir), "strategy": self.it.strategy, "method": self.recipe.method.name,
            "objective": self.recipe.objective.name, "precision": self.recipe.train.precision,
            "continue_from": self.it.start_from, "selection": self.it.rule,
            "rounds_asked": self.it.rounds, "rounds_run": len(rows),
            "stopped_early": bool(rows and rows[-1]["status"] == "stopped"),
            "columns": list(ROUND_COLUMNS), "base": base, "rounds": table,
            "before": first["before"] if first else {},
            "after": trained[-1]["after"] if trained else {},
            "final_model": trained[-1]["model"] if trained else None,
            "wall_time_s": sum(row.get("round_time_s", 0.0) for row in rows),
            "this_process_s": wall,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        print()
        print(format_rounds(([base] if base else []) + table))
        final = summary["final_model"] or "the base (none trained)"
        print(f"\n{len(rows)} of {self.it.rounds} rounds; final model: {final}")
        print(f"run directory: {self.run_dir}")
        return summary


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def load_iterate_prompts(recipe: Recipe) -> list[PromptItem]:
    """data.train's prompts, checked against the strategy and rewards (before any run directory exists)."""
    prompts = load_prompts(recipe.data.train, recipe.data)
    check_iterate_prompts(recipe, prompts)
    return prompts


def run_iterate(recipe: Recipe, *, run_dir: Path | None = None, overwrite: bool = False,
                resume: bool = False) -> dict[str, Any]:
    """Run (or with `resume`, continue) an iterate recipe; returns the summary also saved as summary.json."""
    if recipe.iterate is None:
        raise IterateError("this recipe has no `iterate:` section: use `tunelab run` (docs/iterate.md)")
    from accelerate import PartialState

    if PartialState(cpu=not torch.cuda.is_available()).num_processes > 1:
        raise IterateError("tunelab iterate runs in one process; launch it without torchrun / accelerate launch")
    validate_recipe(recipe)
    prompts = load_iterate_prompts(recipe)  # bad data stops here, before any run directory
    load_tokenizer(recipe.model)  # so does a model that cannot be found
    if run_dir is None:
        run_dir = new_run_dir(recipe.output_dir, recipe.name, overwrite=overwrite, resume=resume)
    else:
        run_dir = Path(run_dir)
        lock_run_dir(run_dir)
    if not resume or not (run_dir / "recipe.yaml").is_file():
        atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    return Rounds(recipe, run_dir, prompts, resume=resume).run()
