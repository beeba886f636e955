"""tunelab GRPO vs TRL's GRPOTrainer: the same model, prompts, rewards, LoRA and settings, on CPU, in one run.

Each side runs in a fresh process (peak RSS is a per-process high-water mark) and reports seconds per step
split into rollout (sampling + rewards + advantages) and update (forward/backward/optimizer), its peak
memory, and its reward curve (mean reward per step):

    python benchmarks/grpo.py                    # SmolLM2-135M-Instruct, date_format, 6 steps each
    python benchmarks/grpo.py --steps 20 --json out.json
    python benchmarks/grpo.py --steps 2 --phases  # and where each side's resident memory goes, phase by phase

Settings (both sides): LoRA r 16 / alpha 32 on every linear, lr 5e-4 constant, bf16 autocast, 4 prompts x 8
completions per step, micro-batches of 16 completions, max 12 new tokens, temperature 0.7, loss `dapo`, beta 0,
epsilon 0.2 / 0.28, rewards = the task's checker + 0.5 x "the answer is an ISO date only" (the shipped
recipes/grpo.yaml's rewards); no dynamic sampling (TRL has none), so both sides sample once per step.
TRL generates with transformers' `generate`; tunelab with its own engine. The first step of each side includes
warm-up; the table reports the mean over steps 2.. and the whole reward curve.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

from _common import HERE, peak_rss_mb, run_child

MODEL = "smollm2-135m-instruct"
TASK = "date_format"
ISO = re.compile(r"\d{4}-\d{2}-\d{2}")


def settings(args) -> dict:
    return {"steps": args.steps, "prompts": 4, "generations": 8, "micro": 16, "max_new": 12, "temperature": 0.7,
            "lr": 5e-4, "seed": 0, "model": args.model, "phases": args.phases}


def run_tunelab(s: dict) -> dict:
    from pathlib import Path

    from tunelab.recipe import load_recipe
    from tunelab.runner import run_recipe
    from tunelab.validate import validate_recipe

    out = tempfile.mkdtemp(prefix="bench-grpo-")
    recipe = validate_recipe(load_recipe(os.path.join(HERE, "..", "recipes", "grpo.yaml"), [
        f"output_dir={out}", "name=tunelab", f"train.max_steps={s['steps']}",
        f"rollout.prompts_per_step={s['prompts']}",
        f"rollout.num_generations={s['generations']}", f"train.batch_size={s['micro']}",
        f"rollout.max_completion_length={s['max_new']}", f"rollout.temperature={s['temperature']}",
        f"train.lr={s['lr']}", "train.save_every=null",
        "eval.before=false", "eval.after=false", "export.adapter=false", "export.merged=false",
        "rollout.log_completions_every=0", "rollout.dynamic_sampling=false",
        "train.warmup_ratio=0", f"train.seed={s['seed']}", f"model.name_or_path={s['model']}"]))
    summary = run_recipe(recipe)
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"rollout_s": [r["rollout_time_s"] for r in rows], "update_s": [r["update_time_s"] for r in rows],
            "reward": [r.get("reward") for r in rows]}


def run_trl(s: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunelab.data.builtin import generate, get_task
    from tunelab.model import load_model, load_tokenizer
    from tunelab.recipe import ModelConfig

    cfg = ModelConfig(name_or_path=s["model"])
    model, tok = load_model(cfg), load_tokenizer(cfg)
    task = get_task(TASK)
    items = generate(task, "train", s["prompts"] * s["steps"] * 2, 0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": it.prompt}], "answer": it.answer} for it in items])

    def task_reward(prompts, completions, answer, **kw):
        return [1.0 if task.check(c[0]["content"], a) else 0.0 for c, a in zip(completions, answer)]

    def iso_reward(prompts, completions, **kw):
        return [1.0 if ISO.fullmatch(c[0]["content"].strip()) else 0.0 for c in completions]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=True, max_steps=s["steps"],
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["prompts"] * s["generations"] // s["micro"], num_generations=s["generations"],
        max_completion_length=s["max_new"], temperature=s["temperature"], beta=0.0, loss_type="dapo", epsilon=0.2,
        epsilon_high=0.28, reward_weights=[1.0, 0.5], logging_steps=1, save_strategy="no", report_to=[],
        seed=s["seed"], max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=[task_reward, iso_reward], args=args, train_dataset=ds,
                          processing_class=tok, peft_config=lora)
    rollout = [0.0]
    inner = trainer._generate_and_score_completions

    def timed(batch):
        t0 = time.perf_counter()
        try:
            return inner(batch)
        finally:
            rollout[0] += time.perf_counter() - t0

    trainer._generate_and_score_completions = timed
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            rollout[0], self.t0 = 0.0, time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({"total": time.perf_counter() - self.t0, "rollout": rollout[0]})

    trainer.add_callback(Clock())
    torch.manual_seed(s["seed"])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"rollout_s": [x["rollout"] for x in steps], "update_s": [x["total"] - x["rollout"] for x in steps],
            "reward": rewards}


def watch_phases(name: str):
    """RSS per phase (--phases): model load, preparation, rollouts, the update's forward, backward, optimizer.
    Each side imports only what it runs (TRL's imports are part of its footprint, not of tunelab's)."""
    from _rss_phases import Phases

    phases = Phases()
    phases.mark("imports")
    import tunelab.model

    phases.wrap(tunelab.model, "load_model", "load model", after="after load")
    if name == "tunelab":
        import tunelab.runner.workspace as workspace
        from tunelab.train.rollout import RolloutSource

        phases.wrap(workspace, "load_model", "load model", after="after load")
        phases.wrap(workspace, "prepare_model", "prepare (LoRA)", after="after prepare")
        phases.wrap(RolloutSource, "micro_batches", "rollout", after="update forward")
    else:
        from trl import GRPOTrainer

        phases.wrap(GRPOTrainer, "__init__", "trainer init", after="after init")
        phases.wrap(GRPOTrainer, "_generate_and_score_completions", "rollout", after="update forward")
    phases.hook_training()
    phases.mark("start run")
    return phases


def child(name: str, s: dict) -> None:
    phases = watch_phases(name) if s.get("phases") else None
    t0 = time.perf_counter()
    out = (run_tunelab if name == "tunelab" else run_trl)(s)
    out.update(name=name, wall_s=time.perf_counter() - t0, peak_mb=peak_rss_mb())
    if phases is not None:
        out["phases"] = phases.rows()
    print(json.dumps(out))


def mean_after_first(xs: list[float]) -> float:
    xs = xs[1:] if len(xs) > 1 else xs
    return sum(xs) / max(len(xs), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model", default=MODEL, help="model of both sides (a built-in alias or an HF directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", choices=("tunelab", "trl"), default=None, help="run one side only")
    p.add_argument("--phases", action="store_true",
                   help="also print each side's RSS per phase (load, prepare, rollout, forward, backward, optimizer)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, json.loads(args.settings))
        return
    s = settings(args)
    results = {name: run_child(os.path.abspath(__file__), name, ["--settings", json.dumps(s)])
               for name in ("tunelab", "trl") if args.only in (None, name)}
    print(f"GRPO, {s['model']}, {TASK}, LoRA r16, {s['prompts']} prompts x {s['generations']} completions, "
          f"{s['max_new']} new tokens, {s['steps']} steps, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'all')}")
    print(f"{'':10} {'rollout s/step':>15} {'update s/step':>14} {'step s':>8} {'steps/s':>8} {'peak MB':>9}")
    rows = {}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:10} failed: {r['error']}")
            continue
        ro, up = mean_after_first(r["rollout_s"]), mean_after_first(r["update_s"])
        rows[name] = (ro + up, r["peak_mb"])
        print(f"{name:10} {ro:15.2f} {up:14.2f} {ro + up:8.2f} {1 / (ro + up):8.3f} {r['peak_mb']:9.0f}")
    if len(rows) == 2:
        print(f"tunelab / TRL: {rows['trl'][0] / rows['tunelab'][0]:.2f}x the steps per second, "
              f"{rows['tunelab'][1] / rows['trl'][1]:.2f}x the peak memory")
    for name, r in results.items():
        if "reward" in r:
            print(f"reward curve {name}: " + " ".join(f"{x:.3f}" if x is not None else "-" for x in r["reward"]))
    if args.phases:
        from _rss_phases import print_phases

        for name, r in results.items():
            if "phases" in r:
                print_phases(name, r["phases"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": s, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
