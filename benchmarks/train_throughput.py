"""Training throughput and peak memory: plain HF transformers + PEFT vs tunelab's engine.

    python benchmarks/train_throughput.py                 # LoRA and full fine-tuning, 4 x 256 tokens
    python benchmarks/train_throughput.py --quick         # fewer steps (a smoke run)

Both sides train SmolLM2-135M-Instruct (the built-in model) on the same rows of real text (WikiText-2
from ../shared/data when present, else the built-in tasks' text), batch 4 x 256 tokens, bf16 autocast,
AdamW; LoRA r=16 alpha=32 on q,k,v,o,gate,up,down. Each configuration runs in its own subprocess so
that peak RSS (CPU) / max allocated (CUDA) belongs to it alone; the parent prints tokens/s, peak memory,
the ratios ours/baseline, and MFU against a bf16 matmul peak measured in this same run.

Baseline loop (the issue's definition):
    loss = model(input_ids, labels=labels).loss; loss.backward(); opt.step(); opt.zero_grad()
Ours: tunelab.runner.train_workspace -> tunelab.train.loop.train (the code `tunelab run` uses).
Model FLOPs per token (Kaplan et al. 2020 convention; attention included): forward 2N + 4·L·T·d,
backward twice that for full fine-tuning, once that for LoRA (no weight gradients of frozen matrices).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import cpu_info, matmul_peak_tflops

SEQ, BATCH = 256, 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_rows(tokenizer, n_rows: int) -> list[list[int]]:
    """n_rows rows of SEQ tokens of real text."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test"
    files = sorted(shared.glob("*")) if shared.is_dir() else []
    text = ""
    for f in files:
        if f.suffix in (".txt", ".raw", "") and f.is_file() and f.name not in ("LICENSE", "SOURCE.txt"):
            text += f.read_text(errors="ignore")
    if len(text) < 100_000:
        from tunelab.data.builtin import list_tasks
        from tunelab.data.builtin.base import generate

        text = "\n".join(f"{it.prompt} {it.answer}" for t in list_tasks() for it in generate(t, "train", 500, 0))
    ids = tokenizer(text[:2_000_000], add_special_tokens=False)["input_ids"]
    need = n_rows * SEQ
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return [ids[i * SEQ:(i + 1) * SEQ] for i in range(n_rows)]


def model_flops_per_token(model, lora: bool) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lora_" not in name)
    n += cfg.vocab_size * cfg.hidden_size  # the (tied) lm_head matmul
    fwd = 2 * n + 4 * cfg.num_hidden_layers * SEQ * cfg.hidden_size
    return fwd * (2 if lora else 3)


def worker_baseline(kind: str, steps: int, warmup: int, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from tunelab.model import load_tokenizer, resolve_model_path
    from tunelab.recipe import ModelConfig

    path, _ = resolve_model_path(ModelConfig())
    tok = load_tokenizer(ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.train()
    # as tunelab (decay 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rows = text_rows(tok, BATCH * (steps + warmup))
    # the rows in the order tunelab's sampler visits them (seed 0), so the last losses are comparable
    from tunelab.data.batching import StepSampler

    sampler = StepSampler(len(rows), BATCH, 1, 1, 0, 0)
    times = []
    for step in range(steps + warmup):
        ids = torch.tensor([rows[i] for i in sampler.micro_batches(step)[0]], device=device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": BATCH * SEQ * len(times) / sum(times), "peak_memory_mb": peak_memory_mb(device),
            "final_loss": float(loss), "flops_per_token": model_flops_per_token(model, kind == "lora")}


def worker_ours(kind: str, steps: int, warmup: int, device: torch.device, extra: list[str]) -> dict:
    import tempfile

    from tunelab.methods.registry import build_method
    from tunelab.model import load_model, load_tokenizer
    from tunelab.objectives.base import build_objective
    from tunelab.runner import Workspace, make_accelerator, train_workspace
    from tunelab.validate import load_validated_recipe

    method = ["method.name=lora", "method.r=16", "method.alpha=32"] if kind == "lora" else ["method.name=full"]
    recipe = load_validated_recipe(None, method + [f"train.max_steps={steps + warmup}", f"train.batch_size={BATCH}",
                                         "train.precision=bf16", "train.warmup_ratio=0", "train.lr=1e-4",
                                         "train.scheduler=constant", "train.max_grad_norm=null",  # as the baseline loop
                                         "data.eval=null", *extra])
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    tok = load_tokenizer(recipe.model)
    rows = text_rows(tok, BATCH * (steps + warmup))
    data = [{"input_ids": r, "labels": r} for r in rows]
    acc = make_accelerator(recipe, run_dir)
    ws = Workspace(recipe, run_dir, acc, tok, load_model(recipe.model), build_method(recipe.method.name,
                   recipe.method_options()), build_objective(recipe.objective.name, recipe.objective_options()),
                   data, None, [])
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        if step > warmup:
            times.append(now - last[0])
        last[0] = now

    recipe.train.save_every = None
    model, result, _ = train_workspace(ws, on_step=on_step)
    return {"tokens_per_s": BATCH * SEQ * len(times) / sum(times), "peak_memory_mb": peak_memory_mb(device),
            "final_loss": result.final_loss, "flops_per_token": model_flops_per_token(model, kind == "lora")}




ABLATIONS = {  # name -> recipe overrides on top of the engine's defaults (what each lever gives, or costs)
    "sdpa attention": ["train.attention=sdpa"],
    "frozen_cast=all": ["train.frozen_cast=all"],
    "compile, frozen_cast=all": ["train.frozen_cast=all", "train.compile=true"],
    "compile, chunk 256": ["train.compile=true", "objective.chunk_size=256"],
    "compile, grad ckpt": ["train.compile=true", "train.gradient_checkpointing=true"],
    "fp32 frozen": ["train.frozen_dtype=float32"],
    "grad ckpt": ["train.gradient_checkpointing=true"],
}


def run_worker(side: str, kind: str, args, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{side}:{kind}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--ours", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        print(f"{side}:{kind} failed:\n{out.stderr[-3000:]}")
        sys.exit(1)
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="Timed steps per configuration.")
    ap.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation happens here).")
    ap.add_argument("--kinds", default="lora,full", help="lora, full, or both (comma-separated).")
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up: a smoke run.")
    ap.add_argument("--ablate", action="store_true",
                    help="Also run tunelab with each lever changed (%s)." % ", ".join(ABLATIONS))
    ap.add_argument("--ours", nargs="*", default=[], help="Extra recipe overrides for tunelab's side.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        side, kind = args.worker.split(":")
        res = (worker_baseline(kind, args.steps, args.warmup, device) if side == "baseline"
               else worker_ours(kind, args.steps, args.warmup, device, args.ours))
        print("RESULT " + json.dumps(res))
        return

    peak = matmul_peak_tflops(device)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"bf16 matmul peak (2048^3): {peak:.2f} TFLOP/s; {cpu_info()}; load average {os.getloadavg()[0]:.2f}")
    print(f"batch {BATCH} x {SEQ} tokens, {args.steps} timed steps after {args.warmup} warm-up\n")
    print(f"{'config':<28}{'tokens/s':>10}{'peak MB':>10}{'MFU':>8}{'loss':>9}{'vs baseline':>22}")
    for kind in args.kinds.split(","):
        runs = [("baseline", "baseline " + kind, []), ("ours", "tunelab " + kind, args.ours),
                ("ours", f"tunelab {kind} +compile", args.ours + ["train.compile=true"])]
        if args.ablate:
            runs += [("ours", f"  {name}", args.ours + ov) for name, ov in ABLATIONS.items()]
        base = None
        for side, label, overrides in runs:
            r = run_worker(side, kind, args, overrides)
            mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
            ratio = ""
            if base is None:
                base = r
            else:
                ratio = (f"{r['tokens_per_s'] / base['tokens_per_s']:>6.2f}x speed "
                         f"{r['peak_memory_mb'] / base['peak_memory_mb']:>5.2f}x mem")
            print(f"{label:<28}{r['tokens_per_s']:>10.0f}{r['peak_memory_mb']:>10.0f}{100 * mfu:>7.1f}%"
                  f"{r['final_loss']:>9.3f}{ratio:>22}", flush=True)
        print()


if __name__ == "__main__":
    main()
