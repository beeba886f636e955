"""Where a decoding step's time goes: the model's forward (transformers) vs the engine's lean Llama-family step
(tunelab.generate.llama), on the built-in model (SmolLM2-135M-Instruct) in bf16, one batch of GSM8K prompts.

    python benchmarks/decode_profile.py                 # batch 32, 24 decoding steps per side
    python benchmarks/decode_profile.py --batch 8 --steps 12

Both sides prefill the same left-padded batch into their own preallocated cache, then decode the same tokens
(the forward side's greedy choices), so their logits are compared bit for bit at every step (the lean step must
equal the forward exactly). It prints per side: ms per step (wall, unprofiled, median) and CPU-ms per step, then a
torch.profiler breakdown per step: matmuls (aten::mm / addmm / bmm), attention (the SDPA kernel), the other aten
operators (elementwise, copies, cat, reshapes), and what is outside any aten operator (Python, transformers'
module machinery: mask creation, cache bookkeeping, kwargs plumbing, hooks), as the profiled step's wall time
minus the self time of its aten operators (the profiler's own cost per operator lands there too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402,F401  (puts src/ on sys.path)

GSM8K = os.path.join(HERE, "..", "..", "shared", "data", "gsm8k", "test.jsonl")


def categorize(name: str) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    return "other aten"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunelab.generate import encode_prompts
    from tunelab.generate.batching import left_pad
    from tunelab.generate.cache import make_cache
    from tunelab.generate.forward import ModelStep, _ForwardDecoder
    from tunelab.generate.llama import LlamaDecoder
    from tunelab.model import load_model, load_tokenizer
    from tunelab.recipe import ModelConfig

    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="bfloat16")
    tok, model = load_tokenizer(cfg), load_model(cfg).eval().requires_grad_(False)
    with open(GSM8K) as f:
        questions = [json.loads(line)["question"] for line in f][: args.batch]
    enc = encode_prompts(tok, [[{"role": "user", "content": q}] for q in questions])
    ids, mask, positions = left_pad(enc, tok.pad_token_id)
    width, warm, profiled = ids.shape[1], 3, 4
    capacity = width + warm + args.steps + profiled
    full = torch.ones(len(enc), capacity, dtype=torch.long)
    full[:, :width] = mask
    print(f"SmolLM2-135M bf16, batch {len(enc)}, prompt width {width}, torch threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")

    with torch.inference_mode():
        step = ModelStep(model)
        sides = {}
        for name in ("forward", "lean"):
            cache = make_cache(step.config, capacity)
            logits = step.prefill(ids, mask, positions, cache)
            dec = (_ForwardDecoder(step, cache, full) if name == "forward"
                   else LlamaDecoder.build(model, cache, full, capacity, torch.bfloat16))
            assert dec is not None, "the lean step does not apply to this model"
            sides[name] = [dec, logits]
        last = positions[:, -1].clone()
        walls: dict[str, list[float]] = {k: [] for k in sides}
        cpus: dict[str, list[float]] = {k: [] for k in sides}
        same = True
        for t in range(warm + args.steps):
            nxt = sides["forward"][1].argmax(-1)
            last = last + 1
            for name, side in sides.items():
                c0, t0 = time.process_time(), time.perf_counter()
                side[1] = side[0].step(nxt.view(-1, 1), last.view(-1, 1))
                if t >= warm:
                    walls[name].append(time.perf_counter() - t0)
                    cpus[name].append(time.process_time() - c0)
            same &= torch.equal(sides["forward"][1], sides["lean"][1])
        print(f"logits bit-identical at every step: {same}")
        print(f"{'side':8}{'ms/step':>9}{'cpu-ms/step':>12}  | profiled, ms/step: {'matmul':>7}{'attention':>10}"
              f"{'other aten':>11}{'outside aten':>13}{'total':>7}  aten calls/step")
        for name, side in sides.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(profiled):
                    nxt = side[1].argmax(-1)
                    last = last + 1
                    side[1] = side[0].step(nxt.view(-1, 1), last.view(-1, 1))
                total = (time.perf_counter() - t0) / profiled * 1000
            cats = {"matmul": 0.0, "attention": 0.0, "other aten": 0.0}
            calls = 0
            for ev in prof.key_averages():
                if ev.key.startswith("aten::"):
                    cats[categorize(ev.key)] += ev.self_cpu_time_total / 1000 / profiled
                    calls += ev.count
            outside = total - sum(cats.values())
            print(f"{name:8}{statistics.median(walls[name]) * 1000:>9.1f}{statistics.median(cpus[name]) * 1000:>12.1f}"
                  f"  | {'':18}{cats['matmul']:>7.1f}{cats['attention']:>10.1f}{cats['other aten']:>11.1f}"
                  f"{outside:>13.1f}{total:>7.1f}  {calls / profiled:.0f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
