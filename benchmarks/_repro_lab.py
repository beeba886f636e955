"""The shared work of benchmarks/reproductions.py: runs, merges and scores, each computed once and reused.

A `Lab` owns one work directory (`<workdir>/full` or `<workdir>/quick`) and its budget. Everything it makes is
named by what it is, so claims share it: `train(seed, "full", 2e-5)` is the same run directory for every claim
that asks for it (reused when its summary and merged export exist); `scores(path, key, specs)` evaluates a model
once per (key, spec) and caches the figures as JSON (atomic writes, `tunelab.core.io`). Only tunelab's public
code runs here: `run_recipe` for training, `run_merge` / `calibrate_bitdelta` for merges, `run_suite` for
evaluation (exact match on built-in tasks, sliding-window perplexity, refusal rate).

`--quick` swaps the built-in SmolLM2-135M-Instruct for the tiny random Llama of tests/tiny.py and shrinks every
budget: it checks that the harness and each claim run end to end in seconds, its figures mean nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from _common import save_tiny_model  # noqa: E402

from tunelab.core.io import atomic_remove, atomic_write_json  # noqa: E402

TASK = "date_format"  # the methods benchmark's task: the base model scores 0% exact match, one run reaches ~100%
WIKITEXT = HERE.parents[1] / "shared" / "data" / "wikitext-2-raw-test" / "wiki.test.raw"


@dataclass(frozen=True)
class Budget:
    steps: int  # optimizer steps of a run
    batch_size: int  # examples per step (one micro-batch)
    n_eval: int  # held-out items: exact match and eval loss
    max_new_tokens: int  # generation budget of exact match ("YYYY-MM-DD" + end of turn is ~8 tokens)
    ppl_chars: int  # prefix of WikiText-2 raw test scored for perplexity (the forgetting probe)
    safety_n: int  # harmful prompts (tunelab's shipped list) for the refusal rate
    calibration_steps: int  # BitDelta's scale distillation
    precision: str


FULL = Budget(steps=16, batch_size=8, n_eval=32, max_new_tokens=16, ppl_chars=20_000, safety_n=24,
              calibration_steps=100, precision="bf16")
QUICK = Budget(steps=3, batch_size=4, n_eval=4, max_new_tokens=8, ppl_chars=2_000, safety_n=4,
               calibration_steps=2, precision="fp32")


def build_tiny(path: Path) -> Path:
    """The tiny random Llama + tokenizer of tests/tiny.py saved as an HF directory (once)."""
    if not (path / "config.json").is_file():
        save_tiny_model(path)
    return path


class Lab:
    def __init__(self, workdir: str | Path, quick: bool = False):
        self.quick = quick
        self.root = Path(workdir) / ("quick" if quick else "full")
        self.b = QUICK if quick else FULL
        self.model = str(build_tiny(self.root / "tiny-model")) if quick else None  # None: the built-in model

    # ---- models -------------------------------------------------------------------------------------------
    def base(self) -> str:
        """The base model's HF directory (the built-in model's converted cache, or the tiny model)."""
        if self.model:
            return self.model
        from tunelab.model import resolve_model_path
        from tunelab.recipe import ModelConfig

        return resolve_model_path(ModelConfig())[0]

    def train(self, seed: int, method: str, lr: float, *, task: str = TASK, steps: int | None = None,
              options: dict[str, Any] | None = None) -> Path:
        """A run of `method` on `task` (SFT on the answer tokens, warmup 10% + cosine), reused when complete.
        Returns its directory: summary.json (eval loss on the held-out items after training), metrics.jsonl
        (the loss of every step) and export/merged (the trained model as a plain HF checkpoint). `options`: the
        method's (its defaults otherwise)."""
        from tunelab.recipe import Recipe
        from tunelab.runner import run_recipe
        from tunelab.validate import validate_recipe

        steps, options = steps or self.b.steps, options or {}
        opts = "".join(f"-{k}{v}" for k, v in sorted(options.items()))
        run = self.root / "runs" / f"{method}{opts}-{task}-lr{lr:g}-s{steps}-seed{seed}"
        if (run / "summary.json").is_file() and (run / "export" / "merged" / "config.json").is_file():
            return run
        recipe = Recipe.model_validate({
            "name": run.name, "output_dir": str(run.parent),
            **({"model": {"name_or_path": self.model}} if self.model else {}),
            "data": {"train": {"builtin": task, "n": steps * self.b.batch_size, "seed": seed},
                     "eval": {"builtin": task, "split": "eval", "n": self.b.n_eval}, "max_length": 128},
            "method": {"name": method, **options},
            "train": {"max_steps": steps, "batch_size": self.b.batch_size, "lr": lr, "warmup_ratio": 0.1,
                      "precision": self.b.precision, "seed": seed, "save_every": None, "keep_checkpoints": 1},
            "eval": {"before": False, "after": True, "exact_match": False, "batch_size": 32},
            "export": {"adapter": False, "merged": True},
        })
        run_recipe(validate_recipe(recipe), overwrite=True)
        atomic_remove(run / "checkpoints")  # the merged export is what claims read; a full checkpoint is ~1.6 GB
        return run

    @staticmethod
    def merged(run: Path) -> Path:
        return run / "export" / "merged"

    @staticmethod
    def eval_loss(run: Path) -> float:
        return json.loads((run / "summary.json").read_text())["after"]["eval_loss"]

    @staticmethod
    def step_losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]

    def merge(self, name: str, recipe: dict[str, Any], *, calibrate: bool = False) -> tuple[Path, dict]:
        """`run_merge` into merges/<name> (rewritten each time: merges are cheap, their outputs large; the claim
        deletes it after scoring). `calibrate`: BitDelta's second stage on WikiText-2 raw."""
        from tunelab.merging.bitdelta import calibrate_bitdelta
        from tunelab.merging.run import run_merge

        out = self.root / "merges" / name
        report: dict[str, Any] = {}
        run_merge(recipe, out, overwrite=True, report=report)
        if calibrate:
            # each scale's lr relative to itself: the reference's absolute 1e-4 overshoots the small scales of a
            # short fine-tune (docs/merging.md; measured in docs/reproductions.md)
            report["distill"] = calibrate_bitdelta(recipe, out, WIKITEXT, steps=self.b.calibration_steps,
                                                   relative_lr=0.02)
        return out, report

    # ---- evaluation ---------------------------------------------------------------------------------------
    def scores(self, path: str | Path, key: str, specs: list[str]) -> dict[str, float]:
        """Figures of the model at `path` (cached under scores/<key>.json, per spec): a built-in task name ->
        exact match on its first n_eval held-out items; "ppl" -> token perplexity of WikiText-2 raw (prefix);
        "refusal" -> refusal rate on the shipped harmful prompts (phrase detector)."""
        cache = self.root / "scores" / f"{key}.json"
        have = json.loads(cache.read_text()) if cache.is_file() else {}
        todo = [s for s in specs if s not in have]
        if todo:
            from tunelab.evaluate.suite import SuiteSettings, run_suite
            from tunelab.model import load_model, load_tokenizer
            from tunelab.recipe import ModelConfig

            cfg = ModelConfig(name_or_path=str(path))
            model, tok = load_model(cfg), load_tokenizer(cfg)
            for spec in todo:
                suite_spec, n = {"ppl": (f"ppl:{WIKITEXT}", 1), "refusal": ("safety", self.b.safety_n)}.get(
                    spec, (spec, self.b.n_eval))
                s = SuiteSettings(n=n, batch_size=32, max_new_tokens=self.b.max_new_tokens,
                                  precision=self.b.precision, ppl_max_chars=self.b.ppl_chars,
                                  safety_max_new_tokens=32, progress=False)
                (result,) = run_suite(model, tok, [suite_spec], s)["tasks"].values()
                if "error" in result:
                    raise RuntimeError(f"{spec} on {path}: {result['error']}")
                have[spec] = {"ppl": "token_perplexity", "refusal": "refusal_rate"}.get(spec, "score")
                have[spec] = float(result[have[spec]])
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, have)
        return {s: have[s] for s in specs}

    def base_scores(self, specs: list[str]) -> dict[str, float]:
        return self.scores(self.base(), "base", specs)

    def drop(self, path: Path) -> None:
        atomic_remove(path)

    def conditions(self) -> dict[str, Any]:
        return {"quick": self.quick, **asdict(self.b)}


def retained(x: float, base: float, ft: float) -> float:
    """Share of a fine-tune's gain over the base that a derived model keeps: (x - base) / (ft - base); NaN when
    the fine-tune gained nothing (there is no gain to keep)."""
    return (x - base) / (ft - base) if ft > base else float("nan")


def forgetting(ppl: float, ppl_base: float) -> float:
    """Relative rise of the general-text perplexity over the base's: ppl / ppl_base - 1 (0 = nothing forgotten)."""
    return ppl / ppl_base - 1.0
