"""Benchmark: peak memory and step time of the selective / sparse / memory-efficient / quantised methods.

Every configuration runs in a fresh subprocess (peak memory is a per-process high-water mark), through
the same Method calls as the training loop: prepare, build_optimizer (or train.optimizer over
param_groups), on_train_start, custom_step or forward_backward + clip + step + zero_grad, on_step_end.

Memory, on CPU: `ru_maxrss` of the child (its lifetime peak resident set) and the resident set right
after the model is loaded (`base`); `extra = peak - base` is what training added on top of the weights.
On CUDA: torch.cuda.max_memory_allocated. `optimizer state` sums the optimizer's state tensors exactly
(the RSS peak also holds allocator slack and transient buffers, e.g. galore-torch's per-matrix SVD and
projection temporaries, so on a small model it can hide a smaller state). The `inference` row runs forward
passes only (no_grad): MeZO should sit at inference level plus a small margin (one perturbation tensor z, the
largest parameter).

  --quick   a small random Llama (hidden 384, 4 layers, vocab 8192, ~9.4M parameters), batch 2 x 64 (small
            activations, so parameter, gradient and optimizer-state memory dominate the differences)
  default   SmolLM2-135M-Instruct (`ModelConfig()`), batch 4 x 256
Step time is the median over the measured steps after one warm-up step; on a shared machine it is
noisy (report it with the load). Surgical's peak includes its one-off calibration backward.

Run:  python benchmarks/methods_memory.py --quick [--only mezo,lora] [--steps 3] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import peak_rss_mb, rss_mb, run_child

# name -> (method name, method options, train.optimizer)
CONFIGS = {
    "inference": (None, {}, "adamw"),
    "full": ("full", {}, "adamw"),
    "full+adamw_8bit": ("full", {}, "adamw_8bit"),
    "lora": ("lora", {"r": 16, "alpha": 32}, "adamw"),
    "qlora": ("qlora", {"r": 16, "alpha": 32}, "adamw"),
    "surgical": ("surgical", {}, "adamw"),
    "hft": ("hft", {}, "adamw"),
    "lisa": ("lisa", {"gamma": 2, "switch_every": 2}, "adamw"),
    "galore": ("galore", {"rank": 32, "update_proj_gap": 200}, "adamw"),
    "mezo": ("mezo", {}, "adamw"),
    "mezo-lora": ("mezo", {"params": "lora", "r": 16, "alpha": 32}, "adamw"),
    "lift": ("lift", {"rank": 32, "density": 0.05, "update_interval": 400}, "adamw"),
    "spiel": ("spiel", {"density": 0.01, "reselect_every": 100, "accumulation_steps": 5}, "adamw"),
    "gmt": ("gmt", {}, "adamw"),
    "smt": ("smt", {"block_size": 64, "warmup_steps": 2}, "adamw"),  # the sparse phase after 2 full steps
}


def build_model(quick: bool):
    import torch

    if not quick:
        from tunelab.model import load_model
        from tunelab.recipe import ModelConfig

        return load_model(ModelConfig()), (4, 256)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg), (2, 64)


def child(name: str, quick: bool, steps: int, precision: str) -> dict:
    import torch
    from accelerate import Accelerator

    from tunelab.methods.registry import build_method, count_parameters
    from tunelab.objectives.base import build_objective
    from tunelab.recipe import TrainConfig
    from tunelab.train.backends import DDPBackend
    from tunelab.train.loop import autocast_context, forward_backward
    from tunelab.train.optim import build_optimizer

    torch.manual_seed(0)
    model, shape = build_model(quick)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))  # [batch, seq]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    acc = Accelerator(cpu=not torch.cuda.is_available())
    backend = DDPBackend(acc)
    model.to(acc.device)
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    cuda = acc.device.type == "cuda"
    base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    method_name, options, optimizer_name = CONFIGS[name]
    sft = build_objective("sft", {})
    times = []
    state_mb = 0.0
    if method_name is None:  # inference: forward passes only
        model.eval()
        trainable = 0
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with torch.no_grad(), autocast_context(acc.device, precision):
                sft.compute(model, batch)
            times.append(time.perf_counter() - t0)
    else:
        tc = TrainConfig(lr=1e-5, precision=precision, optimizer=optimizer_name, weight_decay=0.0)
        method = build_method(method_name, options)
        if method.capabilities.needs_calibration:  # CorDA, EVA, LoRA-GA: initialised from the batch
            method.calibrate(model, [batch])
        elif method.capabilities.calibrates_from_examples:  # surgical: Fisher scores of the batch under SFT
            method.calibrate(model, [batch], objective=sft)
        model = method.prepare(model)
        trainable = count_parameters(model)[0]
        opt = method.build_optimizer(model, tc) or build_optimizer(method.param_groups(model, 0.0), tc)
        clip = [p for g in opt.param_groups for p in g["params"]]
        method.on_train_start(model, steps + 1)
        model.train()
        for step in range(steps + 1):
            t0 = time.perf_counter()
            custom = method.custom_step(model=model, batches=[batch], objective=sft, optimizer=opt, lr=tc.lr,
                                        step=step, ref=None, backend=backend)
            if custom is None:
                forward_backward(model, sft, [batch], backend, precision)
                torch.nn.utils.clip_grad_norm_(clip, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            method.on_step_end(model, step + 1, opt)
            times.append(time.perf_counter() - t0)
        state_mb = sum(v.numel() * v.element_size() for st in opt.state.values() if isinstance(st, dict)
                       for v in st.values() if torch.is_tensor(v)) / 2**20
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"name": name, "peak_mb": peak, "base_mb": base, "extra_mb": peak - base, "trainable": trainable,
            "optimizer_state_mb": state_mb,
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "largest_param_mb": largest}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small random model instead of SmolLM2-135M")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(CONFIGS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.steps, args.precision)))
        return
    names = list(CONFIGS) if not args.only else ["inference"] + [n for n in args.only.split(",") if n != "inference"]
    rows = []
    for name in names:
        out = run_child(__file__, name, ["--steps", str(args.steps), "--precision", args.precision]
                        + (["--quick"] if args.quick else []))
        if "error" in out:
            print(f"{name}: FAILED: {out['error']}\n{out.get('stderr_tail', '')}", file=sys.stderr)
            continue
        rows.append(out)
        r = rows[-1]
        print(f"{r['name']:<16} peak {r['peak_mb']:8.1f} MB  extra {r['extra_mb']:8.1f} MB  "
              f"optimizer state {r['optimizer_state_mb']:7.1f} MB  step {r['step_s']:7.3f} s  "
              f"trainable {r['trainable']:>11,}", flush=True)
    by = {r["name"]: r for r in rows}
    if "inference" in by and "mezo" in by:
        inf, mz = by["inference"], by["mezo"]
        margin = inf["largest_param_mb"] + 0.05 * inf["base_mb"]
        ok = mz["peak_mb"] <= inf["peak_mb"] + margin
        print(f"\nMeZO peak {mz['peak_mb']:.1f} MB vs inference {inf['peak_mb']:.1f} MB "
              f"(+{mz['peak_mb'] - inf['peak_mb']:.1f} MB; allowed margin {margin:.1f} MB = largest parameter "
              f"+ 5% of the loaded process): {'OK' if ok else 'ABOVE MARGIN'}")
        if "full" in by:
            print(f"full fine-tuning adds {by['full']['extra_mb']:.1f} MB over the loaded model; "
                  f"MeZO adds {mz['extra_mb']:.1f} MB")


if __name__ == "__main__":
    main()
