"""transformers' `generate` vs tunelab's generation engine on the built-in model (SmolLM2-135M-Instruct).

    python benchmarks/generation.py              # greedy + sampled, batch 8 / 32 / 64, 16 and 128 new tokens,
                                                 # and RL-style rollouts (8 prompts x 8 samples)
    python benchmarks/generation.py --quick      # batch 32 only, one batch of prompts per configuration
    python benchmarks/generation.py --ablate     # batch 32, 128 tokens: the engine's levers one at a time
    python benchmarks/generation.py --batch-sizes 32 --sides hf tunelab-hf-forward tunelab   # chosen sides only

Prompts: GSM8K test questions (../shared/data/gsm8k) as chat turns, 2 batches per configuration, left padding,
the same stop ids on every side; sampled = temperature 1, top-p 0.95, top-k off. The model is frozen
(requires_grad False), as evaluation sees a LoRA run's base: transformers' generate then pays the prefill's
[B, d, vocab] weight expansion of docs/engine.md's known issue (with weights that require grad it does not). Sides:
  hf        transformers' generate on the model in the device's fast dtype (bf16 where the CPU computes it
            natively, else fp32) and on the engine's own length-sorted batches (tunelab.generate.plan_batches):
            the strongest baseline, and the one whose greedy token ids must equal the engine's (the parent
            compares them prompt by prompt);
  hf-fp32   (batch 32 only) transformers' generate on the model as `tunelab.model.load_model` returns it (fp32),
            batches in the prompts' order: what one gets out of the box;
  tunelab   the engine (`tunelab.generate.generate`), from the same fast-dtype model;
  rollout   8 prompts x 8 sampled completions, 128 tokens (transformers' `num_return_sequences`; tunelab also
            with `drop_finished`, as an RL rollout runs it).

Each side runs in a fresh process after a short warm-up. tokens/s counts generated tokens up to and including
each row's stop token, over wall time; tok/cpu-s over the process's CPU time (steadier on a shared machine);
TTFT is per batch (its start -> its first token; transformers' through a streamer), averaged; peak MB is the
process's peak RSS during generation (VmHWM, reset after loading), extra MB that peak minus the RSS before.

`--ablate` (greedy): transformers' generate on batches in the prompts' order (what length sorting gives); the
engine with every decoding step through the model's forward instead of the lean Llama-family step
(`tunelab-hf-forward`: the engine before generate/llama.py), with transformers' DynamicCache instead of the
preallocated one, with `drop_finished`, and from fp32
weights (cast to bf16 for the call); transformers' generate on fp32 weights under bf16 autocast (the path
tunelab's evaluation took before the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import run_child  # noqa: E402

GSM8K = os.path.join(HERE, "..", "..", "shared", "data", "gsm8k", "test.jsonl")
SIDES = ("hf", "tunelab")
AS_LOADED = "hf-fp32"  # at batch 32 only: fp32 decoding is slow
ROLLOUT_SIDES = ("hf", "tunelab", "tunelab-drop-finished")
ABLATIONS = ("hf-dataset-order", "tunelab-hf-forward", "tunelab-dynamic-cache", "tunelab-drop-finished",
             "tunelab-fp32-weights", "hf-fp32-autocast")
FP32_SIDES = ("hf-fp32", "tunelab-fp32-weights", "hf-fp32-autocast")
DATASET_ORDER = ("hf-fp32", "hf-dataset-order")
ROLLOUT_SAMPLES = 8


def cpu_info() -> dict:
    import torch

    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__}


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) so the generation's own peak is measured, not the loading's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load(n_prompts: int, fp32: bool):
    import torch

    from tunelab.model import load_model, load_tokenizer
    from tunelab.recipe import ModelConfig

    native_bf16 = cpu_info()["avx512_bf16"] or cpu_info()["amx_bf16"]
    dtype = "float32" if fp32 or not native_bf16 else "bfloat16"
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype=dtype)
    tok, model = load_tokenizer(cfg), load_model(cfg).eval().requires_grad_(False)
    with open(GSM8K) as f:
        questions = [json.loads(line)["question"] for line in f][:n_prompts]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    precision = "bf16" if native_bf16 else "fp32"
    torch.manual_seed(0)
    return tok, model, prompts, precision


def hf_side(model, tok, prompts, batch, new, sample, stops, *, sorted_batches: bool, samples: int = 1,
            autocast: bool = False) -> dict:
    """transformers' generate; TTFT through a streamer (it gets the prompt, then every step's tokens)."""
    import contextlib

    import torch
    from transformers.generation.streamers import BaseStreamer

    from tunelab.generate import encode_prompts, plan_batches
    from tunelab.generate.batching import left_pad

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.t_first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.t_first is None:  # call 1 is the prompt
                self.t_first = time.perf_counter()

        def end(self):
            pass

    enc = encode_prompts(tok, prompts)
    per_batch = max(1, batch // samples)
    if sorted_batches:
        batches = plan_batches([len(e) for e in enc], per_batch)
    else:
        batches = [list(range(s, min(s + per_batch, len(enc)))) for s in range(0, len(enc), per_batch)]
    ids_out: list[list[int]] = [[] for _ in range(len(enc) * samples)]
    ttft = []
    kw = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    torch.manual_seed(0)
    for idx in batches:
        ids, mask, _ = left_pad([enc[i] for i in idx], tok.pad_token_id)
        streamer, t0 = FirstToken(), time.perf_counter()
        with torch.inference_mode(), ctx:
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, eos_token_id=list(stops),
                                 pad_token_id=tok.pad_token_id, streamer=streamer, num_return_sequences=samples,
                                 **kw)
        ttft.append(streamer.t_first - t0)
        for r in range(seq.shape[0]):
            row = seq[r, ids.shape[1]:].tolist()
            ids_out[idx[r // samples] * samples + r % samples] = row[: next(
                (k + 1 for k, t in enumerate(row) if t in stops), len(row))]
    return {"ids": ids_out, "ttft": ttft}


def tunelab_side(model, tok, prompts, batch, new, sample, stops, precision, samples: int = 1, **cfg_kw) -> dict:
    from tunelab.generate import GenerateConfig, generate

    kw = dict(do_sample=True, temperature=1.0, top_p=0.95, seed=0) if sample else {}
    cfg = GenerateConfig(max_new_tokens=new, batch_size=batch, stop_token_ids=stops, precision=precision,
                         num_return_sequences=samples, **kw, **cfg_kw)
    out = generate(model, tok, prompts, cfg)
    return {"ids": [c.token_ids for c in out.completions], "ttft": out.stats.first_token_seconds}


def child(args) -> dict:
    import torch

    from tunelab.data.turns import stop_token_ids
    from tunelab.generate import GenerateConfig, generate

    side = args.child
    samples = ROLLOUT_SAMPLES if args.mode == "rollout" else 1
    n_prompts = args.batch * args.batches // samples
    fp32 = side in FP32_SIDES
    tok, model, prompts, precision = load(n_prompts, fp32=fp32)
    stops = tuple(stop_token_ids(tok, model.generation_config))
    sample = args.mode in ("sampled", "rollout")
    hf_kw = dict(sorted_batches=side not in DATASET_ORDER, samples=samples, autocast=side == "hf-fp32-autocast")
    # warm-up: oneDNN builds its kernels for new shapes on first use
    generate(model, tok, prompts[:2], GenerateConfig(max_new_tokens=4, precision=precision))
    if side.startswith("hf"):
        hf_side(model, tok, prompts[:2], 2, 4, sample, stops, **{**hf_kw, "samples": 1})
    reset_peak()
    rss0 = status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    if side.startswith("hf"):
        res = hf_side(model, tok, prompts, args.batch, args.new, sample, stops, **hf_kw)
    else:
        if side == "tunelab-hf-forward":  # every decoding step through the model's forward, not the lean step
            from tunelab.generate.llama import LlamaDecoder

            LlamaDecoder.build = classmethod(lambda cls, *a, **k: None)  # type: ignore[method-assign]
        if side == "tunelab-dynamic-cache":  # transformers' own cache (torch.cat per layer per step)
            import transformers

            import tunelab.generate.engine as engine

            engine.make_cache = lambda config, capacity: transformers.DynamicCache(config=config)
        extra = {"drop_finished": True} if side == "tunelab-drop-finished" else {}
        res = tunelab_side(model, tok, prompts, args.batch, args.new, sample, stops, precision, samples, **extra)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(r) for r in res["ids"])
    return {"name": side, "tokens": tokens, "seconds": seconds, "cpu_s": cpu, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "ttft_s": sum(res["ttft"]) / len(res["ttft"]),
            "peak_mb": status_mb("VmHWM"), "extra_mb": status_mb("VmHWM") - rss0, "precision": precision,
            "threads": torch.get_num_threads(), "ids": res["ids"] if not sample else None}


def compare(r: dict, base: dict | None) -> tuple[str, str, str]:
    """(speed ratio, memory ratio, greedy agreement) of `r` against the baseline row `base`."""
    if not base or "error" in base:
        return "", "", ""
    speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x"
    same = ""
    if r.get("ids") is not None and base.get("ids") is not None:
        diff = sum(a != c for a, c in zip(r["ids"], base["ids"]))
        same = "identical" if diff == 0 else f"{diff} of {len(r['ids'])} prompts differ"
    return speed, mem, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 32 only, one batch of prompts per configuration")
    ap.add_argument("--ablate", action="store_true", help="the engine's levers at batch 32, 128 tokens, greedy")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--modes", nargs="+", default=None, choices=["greedy", "sampled", "rollout"],
                    help="default: greedy sampled rollout (--quick: greedy sampled)")
    ap.add_argument("--batches", type=int, default=None, help="batches of prompts per configuration (default 2)")
    ap.add_argument("--sides", nargs="+", default=None, choices=sorted({*SIDES, AS_LOADED, *ROLLOUT_SIDES, *ABLATIONS}),
                    help="run only these sides (hf first: the others are compared with it)")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--new", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = args.batch_sizes or ([32] if args.quick or args.ablate else [8, 32, 64])
    batches = args.batches or (1 if args.quick else 2)
    modes = args.modes or (["greedy", "sampled"] if args.quick else ["greedy", "sampled", "rollout"])
    plan = [(m, b, n, SIDES + ((AS_LOADED,) if b == 32 else ())) for m in modes if m != "rollout" for b in sizes
            for n in args.new_tokens]
    if "rollout" in modes:  # the largest batch, as prompts x 8 samples (by default 8 x 8 = 64 rows), 128 tokens
        rows = max(ROLLOUT_SAMPLES, max(sizes) // ROLLOUT_SAMPLES * ROLLOUT_SAMPLES)
        plan.append(("rollout", rows, max(args.new_tokens), ROLLOUT_SIDES))
    if args.ablate:
        plan = [("greedy", b, 128, SIDES + ABLATIONS) for b in sizes]
    if args.sides:
        plan = [(m, b, n, tuple(args.sides)) for m, b, n, _ in plan]
    info = cpu_info()
    print(f"cpu: {info['cpu']}; torch capability {info['capability']}; avx512_bf16 {info['avx512_bf16']}, "
          f"amx_bf16 {info['amx_bf16']}; {info['cores']} cores, torch threads {info['threads']}; "
          f"torch {info['torch']}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'mode':8}{'batch':>6}{'new':>5}  {'side':23}{'tokens':>7}{'tok/s':>8}{'tok/cpu-s':>10}{'TTFT s':>8}"
          f"{'peak MB':>9}{'extra MB':>9}  vs hf: speed   mem  greedy ids", flush=True)
    results = []
    for mode, b, n, sides in plan:
        rows: dict[str, dict] = {}
        for side in sides:
            r = run_child(__file__, side, ["--mode", mode, "--batch", str(b), "--new", str(n),
                                           "--batches", str(1 if mode == "rollout" else batches)])
            rows[side] = r
            if "error" in r:
                print(f"{mode:8}{b:>6}{n:>5}  {side:23}ERROR {r['error']}", flush=True)
                results.append({"mode": mode, "batch": b, "new_tokens": n, **r})
                continue
            speed, mem, same = compare(r, rows.get("hf")) if side != "hf" else ("", "", "")
            results.append({"mode": mode, "batch": b, "new_tokens": n, "speed_vs_hf": speed, "mem_vs_hf": mem,
                            "greedy_ids_vs_hf": same, **{k: v for k, v in r.items() if k != "ids"}})
            print(f"{mode:8}{b:>6}{n:>5}  {side:23}{r['tokens']:>7}{r['tokens_per_s']:>8.1f}"
                  f"{r['tokens_per_cpu_s']:>10.1f}{r['ttft_s']:>8.2f}{r['peak_mb']:>9.0f}{r['extra_mb']:>9.0f}  "
                  f"{speed:>12} {mem:>5}  {same}", flush=True)
        if AS_LOADED in rows and "error" not in rows[AS_LOADED] and "error" not in rows.get("tunelab", {"error": 1}):
            print(f"{'':19}tunelab vs {AS_LOADED} (the model as loaded, batches in the prompts' order): "
                  f"{compare(rows['tunelab'], rows[AS_LOADED])[0]} speed, "
                  f"{compare(rows['tunelab'], rows[AS_LOADED])[1]} memory", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
