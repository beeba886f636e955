"""Three engine levers on their own, each against its baseline in the same run (docs/engine.md).

    python benchmarks/engine_levers.py            # all three
    python benchmarks/engine_levers.py --only attention,adamw

  attention   forward + backward of one SmolLM2-135M attention (4 x 9 query heads, 3 KV heads, 256 tokens,
              head dim 64, bf16): torch's sdpa (the CPU flash kernel) vs tunelab's grouped_causal_attention
  adamw       one AdamW step over 108M fp32 parameters (SmolLM2's 90 MLP-sized matrices + the embedding):
              foreach vs fused; step time and the step's extra peak RSS
  allocator   LoRA training steps of SmolLM2-135M-Instruct (4 x 256 tokens, bf16) with glibc's default
              malloc vs `keep_freed_memory()`: step time, kernel (sys) time, peak RSS

Every variant runs in its own subprocess (peak RSS and malloc settings are per process); the parent prints
each pair and the ratio ours / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

PAIRS = {"attention": ("sdpa", "tunelab"), "adamw": ("foreach", "fused"), "allocator": ("glibc default", "keep freed")}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention(variant: str, reps: int = 20) -> dict:
    import torch.nn.functional as F

    from tunelab.train.attention import grouped_causal_attention

    b, h, hkv, t, d = 4, 9, 3, 256, 64
    q = torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, t, d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, t, d, dtype=torch.bfloat16, requires_grad=True)
    if variant == "sdpa":
        def fn():  # [B, T, H, D] like ours
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    else:
        def fn():
            return grouped_causal_attention(q, k, v, None, d ** -0.5)
    for _ in range(3):
        fn().float().sum().backward()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn().float().sum().backward()
    return {"ms": (time.perf_counter() - t0) / reps * 1000}


def adamw(variant: str, reps: int = 3) -> dict:
    params = ([torch.nn.Parameter(torch.randn(576, 1536)) for _ in range(90)]
              + [torch.nn.Parameter(torch.randn(49152, 576))])
    for p in params:
        p.grad = torch.randn_like(p)
    before = rss_mb()
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if variant == "fused" else {"foreach": True}))
    opt.step()  # creates the state
    t0 = time.perf_counter()
    for _ in range(reps):
        opt.step()
    return {"ms": (time.perf_counter() - t0) / reps * 1000, "extra_peak_mb": rss_mb() - before}


def allocator(variant: str, steps: int = 4) -> dict:
    from peft import LoraConfig, get_peft_model

    from tunelab.model import load_model
    from tunelab.recipe import ModelConfig, TrainConfig
    from tunelab.train.engine import configure_engine

    if variant == "keep freed":
        from tunelab.train.allocator import keep_freed_memory

        assert keep_freed_memory()
    model = get_peft_model(load_model(ModelConfig()), LoraConfig(
        r=16, lora_alpha=32, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    # the engine's other switches, without its allocator call (this benchmark decides that one)
    import tunelab.train.engine as engine

    engine.keep_freed_memory = lambda: False
    configure_engine(model, TrainConfig(), torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times, sys0 = [], None
    for step in range(steps + 1):
        ids = torch.randint(100, 40000, (4, 256), generator=g)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # warm-up
            sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        else:
            times.append(time.perf_counter() - t0)
    return {"ms": sum(times) / len(times) * 1000, "sys_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0,
            "peak_mb": rss_mb()}


WORKERS = {"attention": attention, "adamw": adamw, "allocator": allocator}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker[0]](args.worker[1])))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for lever in args.only.split(","):
        results = []
        for variant in PAIRS[lever]:
            out = subprocess.run([sys.executable, __file__, "--worker", lever, variant], capture_output=True, text=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{lever} / {variant} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(line[0][7:]))
        (base_name, ours_name), (base, ours) = PAIRS[lever], results
        print(f"\n{lever}")
        for key in base:
            print(f"  {key:<14}{base_name:>16} {base[key]:10.2f}   {ours_name:>12} {ours[key]:10.2f}   "
                  f"ratio {ours[key] / base[key]:5.2f}x" if base[key] else f"  {key}: {base[key]} / {ours[key]}")


if __name__ == "__main__":
    main()
