"""Benchmark: per-process peak memory of DDP vs FSDP2 (and DeepSpeed ZeRO-3), full fine-tuning on 2 processes.

Every configuration is a fresh `torchrun --nproc_per_node 2` (peak memory is a per-process high-water mark) that
goes through tunelab's own pieces, as `tunelab run` does: the model is loaded whole in every process, the
`full` method prepares it, `train.engine.configure_engine` applies the engine's switches, the configuration's
Backend (train/backends.py) prepares model and optimizer, then `loop.forward_backward` (chunked cross-entropy
SFT loss on random tokens) + the backend's clipping + AdamW, for `--steps` optimizer steps. fp32 weights and
compute (no autocast), batch `--batch` x `--seq` tokens per process.

Models:
  smollm2     the built-in SmolLM2-135M-Instruct (`ModelConfig()`), 135M parameters, tied embeddings
  llama-0.3b  a Llama built from a config with random weights: hidden 1024, 22 layers, MLP 2816, vocab 32000,
              tied embeddings (~0.32B parameters)
  tiny        a 4-layer random Llama (a quick check of the script itself)

Each process reports its RSS after loading the model, after the backend prepared it (sharded or wrapped), after
the first optimizer step (AdamW's state exists from then on), and its lifetime peak (`ru_maxrss`); the table
shows the larger of the two processes and the ratio to DDP's, and the analytic per-process sizes of weights,
gradients and AdamW moments (4 bytes each: P + P + 2P for DDP; divided by the 2 processes under sharding) so
the rest can be attributed: the whole model each process loads before sharding (FSDP2 and ZeRO-3 start from a
full copy), the gathered layer(s), activations, communication buffers, the Python / torch runtime (~0.3 GB).
`held` is the resident set after the last step once glibc has given freed memory back (`malloc_trim`): what
training keeps between steps (weights, AdamW state, buffers); the peak minus `held` is what one step needs on top
(activations, gradients, gathered layers) plus freed memory glibc kept for reuse.

Each runs without and with activation checkpointing (`--checkpointing no,yes`): activations are per process and
not sharded, so recomputing them in backward shows what sharding does to the rest.

Run:  python benchmarks/distributed_memory.py [--models smollm2,llama-0.3b] [--backends ddp,fsdp,deepspeed]
             [--checkpointing no,yes] [--steps 3] [--batch 2] [--seq 256] [--json out.json]
A configuration whose estimated need exceeds the machine's available memory is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

from _common import HERE, child_env, last_error_line, peak_rss_mb, rss_mb

MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048),
    "llama-0.3b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
}
BACKENDS = {"ddp": {"backend": "ddp"}, "fsdp": {"backend": "fsdp"},
            "deepspeed": {"backend": "deepspeed", "deepspeed": {"zero_stage": 3}}}
LABEL = {"ddp": "DDP", "fsdp": "FSDP2", "deepspeed": "ZeRO-3"}
NPROC = 2


def build_model(name: str):
    import torch

    if name == "smollm2":
        from tunelab.model import load_model
        from tunelab.recipe import ModelConfig

        return load_model(ModelConfig())
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg)


def child(name: str, model_name: str, steps: int, batch: int, seq: int, ac: bool) -> dict:
    """One process of one configuration; rank 0 returns every rank's figures. `ac`: activation checkpointing
    (FSDP2's per-layer `distributed.fsdp.activation_checkpointing`, else `train.gradient_checkpointing`)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from tunelab.methods.registry import build_method, count_parameters
    from tunelab.objectives.base import build_objective
    from tunelab.recipe import Recipe
    from tunelab.train.backends import build_backend
    from tunelab.train.engine import configure_engine
    from tunelab.train.loop import forward_backward
    from tunelab.train.optim import build_optimizer

    dist_cfg = {**BACKENDS[name], **({"fsdp": {"activation_checkpointing": True}} if ac and name == "fsdp" else {})}
    recipe = Recipe.model_validate({"method": {"name": "full"}, "distributed": dist_cfg,
                                    "train": {"batch_size": batch, "precision": "fp32", "lr": 1e-5,
                                              "max_grad_norm": 1.0,
                                              "gradient_checkpointing": ac and name != "fsdp"}})
    acc = Accelerator(cpu=not torch.cuda.is_available())
    backend = build_backend(recipe, acc)
    marks = {"start": rss_mb()}
    model = build_model(model_name)
    marks["loaded"] = rss_mb()
    method = build_method("full", {})
    model = method.prepare(model)
    configure_engine(model, recipe.train, backend.device)
    params = count_parameters(model)[1]
    vocab = model.config.vocab_size
    tc = recipe.train
    model, optimizer = backend.prepare(
        model, lambda m: method.build_optimizer(m, tc) or build_optimizer(method.param_groups(m, 0.0), tc))
    marks["prepared"] = rss_mb()
    objective = build_objective("sft", {})
    g = torch.Generator().manual_seed(1 + backend.process_index)
    clip = [p for grp in optimizer.param_groups for p in grp["params"]]
    per_step: list[float] = []
    for step in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        micro = [{"input_ids": ids.to(backend.device), "attention_mask": torch.ones_like(ids).to(backend.device),
                  "labels": ids.to(backend.device)}]
        forward_backward(model, objective, micro, backend, "fp32")
        backend.clip_grad_norm(clip, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.end_step()
        if step == 0:
            marks["after_step_1"] = rss_mb()
        per_step.append(rss_mb())
    marks["end"] = rss_mb()
    # what training holds between steps: freed memory glibc kept (it is reused, so it is in the peak) given back
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    marks["held"] = rss_mb()
    mine = {"rank": backend.process_index, "peak_mb": peak_rss_mb(), **{f"{k}_mb": v for k, v in marks.items()},
            "steps_mb": per_step, "optimizer": type(optimizer).__name__,
            "optimizer_state_mb": _state_mb(optimizer)}
    ranks = gather_object([mine]) if backend.num_processes > 1 else [mine]
    return {"name": name, "model": model_name, "ac": ac, "params": params, "world": backend.num_processes,
            "ranks": ranks}


def _state_mb(optimizer) -> float:
    """This process's optimizer state (its local shards), MB."""
    import torch

    total = 0
    for st in getattr(optimizer, "state", {}).values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def estimate_mb(params: float, backend: str) -> float:
    """A rough need of both processes together, to skip what cannot fit: 16 bytes per parameter (weights, gradient,
    AdamW moments) + a DDP bucket copy, divided by the processes under sharding, + 1.5 GB per process."""
    per = params * (20 if backend == "ddp" else 4 + 12 / NPROC) / 2**20
    return NPROC * (per + 1500)


PARAMS = {"tiny": 1.1e6, "smollm2": 135e6, "llama-0.3b": 0.32e9}


def launch(name: str, model: str, ac: bool, args) -> dict:
    need = estimate_mb(PARAMS[model], name)
    if need > available_mb():
        return {"name": name, "model": model, "ac": ac, "error": f"skipped: needs ~{need / 1024:.1f} GB, "
                                                                  f"{available_mb() / 1024:.1f} GB available"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_port",
           str(free_port()), os.path.join(HERE, "distributed_memory.py"), "--child", name, "--model", model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)] + (["--ac"] if ac else [])
    env = {**child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"name": name, "model": model, "ac": ac,
            "error": last_error_line(out.stderr) or f"exit code {out.returncode}"}


def table(results: list[dict]) -> str:
    rows = ["| model | act. ckpt | backend | params | peak / process | vs DDP | loaded | prepared | after step 1 | "
            "held | AdamW state | weights + grads + AdamW (analytic) |", "|---" * 12 + "|"]
    ddp = {(r["model"], r["ac"]): max(x["peak_mb"] for x in r["ranks"]) for r in results
           if r["name"] == "ddp" and "ranks" in r}
    for r in results:
        ac = "yes" if r["ac"] else "no"
        if "ranks" not in r:
            rows.append(f"| {r['model']} | {ac} | {LABEL[r['name']]} | | {r['error']} | | | | | | | |")
            continue
        worst = max(r["ranks"], key=lambda x: x["peak_mb"])
        p = r["params"]
        analytic = 16 * p / 2**20 if r["name"] == "ddp" else 16 * p / 2**20 / r["world"]
        key = (r["model"], r["ac"])
        ratio = f"{worst['peak_mb'] / ddp[key]:.2f}x" if key in ddp else ""
        rows.append(f"| {r['model']} | {ac} | {LABEL[r['name']]} | {p / 1e6:.0f}M | {worst['peak_mb']:.0f} MB | "
                    f"{ratio} | {worst['loaded_mb']:.0f} | {worst['prepared_mb']:.0f} | "
                    f"{worst['after_step_1_mb']:.0f} | {worst['held_mb']:.0f} | {worst['optimizer_state_mb']:.0f} | "
                    f"{analytic:.0f} MB |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="llama-0.3b")
    ap.add_argument("--models", default="smollm2,llama-0.3b")
    ap.add_argument("--backends", default="ddp,fsdp,deepspeed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--ac", action="store_true", help="(child) activation checkpointing")
    ap.add_argument("--checkpointing", default="no,yes",
                    help="activation checkpointing variants to run: no, yes or no,yes")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.model, args.steps, args.batch, args.seq, args.ac)
        if result["ranks"][0]["rank"] == 0 and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return
    results = []
    variants = [v == "yes" for v in args.checkpointing.split(",")]
    for model in args.models.split(","):
        for ac in variants:
            for name in args.backends.split(","):
                r = launch(name, model, ac, args)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    print(table(results))
    for r in results:
        ddp = next((d for d in results if (d["model"], d["ac"], d["name"]) == (r["model"], r["ac"], "ddp")
                    and "ranks" in d), None)
        if r["name"] != "ddp" and "ranks" in r and ddp:
            a = max(x["peak_mb"] for x in r["ranks"]) / max(x["peak_mb"] for x in ddp["ranks"])
            what = f"{r['model']}{' +act. ckpt' if r['ac'] else ''}"
            print(f"{what}: {LABEL[r['name']]} / DDP per-process peak = {a:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
