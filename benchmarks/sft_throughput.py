"""LoRA SFT on real instruction data of varied length: TRL, HF + PEFT and tunelab, the same examples in the same order.

    python benchmarks/sft_throughput.py                     # LIMA and the Alpaca subset, max length 1024 and 512
    python benchmarks/sft_throughput.py --quick             # the tiny random Llama, 16 short examples: a check
    python benchmarks/sft_throughput.py --data lima --max-length 512 --sides trl-defaults --append r.jsonl
    python benchmarks/sft_throughput.py --table r.jsonl     # the table of results gathered side by side

Data: the first `--n` (64) records of ../shared/data/lima (LIMA, alpaca form with history) or alpaca-cherry-5pct,
as chat turns through the built-in model's chat template (SmolLM2-135M-Instruct), encoded ONCE by tunelab's
encoder (data.truncation right: the first max_length tokens; loss on the last assistant turn) and given to every
side as token ids + labels: TRL takes pre-tokenized data as is, so every side sees the same tokens. The order is
tunelab's sampler's (seed 0); TRL and the plain loop read the examples in that order (TRL's sampler replaced by a
sequential one); one epoch, batch 4 examples; LoRA r 16, alpha 32, no dropout, on q,k,v,o,gate,up,down; AdamW,
lr 1e-4 constant, no warm-up, no weight decay, clipping at 1.0 on every side.
Sides (each in a fresh process; peak memory is the process's peak RSS):
  trl-defaults      TRL's SFTTrainer with SFTConfig's defaults (bf16 autocast, gradient checkpointing on,
                    padding to the longest in the batch)
  trl-padding-free  + padding_free=True (one flattened row per batch, position ids; max_length None: the inputs
                    are already cut)
  trl-packing       + packing=True (best-fit-decreasing packing into rows of max_length; padding-free)
  hf-peft           transformers + PEFT, a plain loop: pad to the longest, bf16 autocast, loss = model(...).loss
  tunelab           tunelab as shipped (the recipe names only the data, LoRA and the shared hyperparameters;
                    `train.compile: auto` compiles on CPU, from inductor's on-disk cache when it holds the graphs)
  tunelab+K=V+...   tunelab with recipe overrides (e.g. tunelab+train.compile=false: the eager engine)
Figures: useful tokens/s = non-padding tokens over the wall time of the training call (trainer.train(),
tunelab's train_workspace, the loop; loading the model, encoding the data and applying LoRA / the engine's switches
excluded on every side; compilation and the first steps included: what a user waits for) and over steps 3..
("steady"); peak RSS; the mean of the per-step losses; MFU = model FLOPs of the useful tokens (Kaplan et al.
2020: forward 2N + 4 L T d per token, T the example's length; LoRA backward once that) over a bf16 2048^3 matmul
peak measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import cpu_info, matmul_peak_tflops, peak_rss_mb, run_child, tiny_model_dir  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data")
FILES = {"lima": os.path.join(DATA, "lima", "lima.json"),
         "alpaca": os.path.join(DATA, "alpaca-cherry-5pct", "cherry_alpaca_5_percent.json")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LR, SEED = 4, 1e-4, 0
DEFAULT_SIDES = ("trl-defaults", "trl-padding-free", "trl-packing", "hf-peft", "tunelab", "tunelab+train.compile=false",
                 "tunelab+train.gradient_checkpointing=true")


def write_records(data: str, n: int, path: str) -> None:
    """The first n records as {"messages": [...]} (tunelab's alpaca reader: history turns, then the instruction)."""
    from tunelab.data.formats import Record, to_example

    if data == "tiny":  # varied lengths for the check
        rows = [{"instruction": f"Count to {k}.", "output": " ".join(str(i) for i in range(3 * k))} for k in range(n)]
    else:
        with open(FILES[data]) as f:
            rows = json.load(f)[:n]
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"messages": to_example(Record(r, f"{data}[{i}]"), "alpaca", None).messages}) + "\n")


def model_source(args):
    """(ModelConfig, HF directory) of the model every side trains."""
    from tunelab.model import resolve_model_path
    from tunelab.recipe import ModelConfig

    cfg = ModelConfig(name_or_path=args.model_dir or "smollm2-135m-instruct")
    return cfg, resolve_model_path(cfg)[0]


def encoded_in_order(args, tok) -> tuple[list[dict], list[int]]:
    """tunelab's encoding of the records (as a run encodes them) and the order its sampler visits them."""
    from tunelab.data.batching import StepSampler
    from tunelab.data.pipeline import encode_spec
    from tunelab.recipe import DataConfig, DatasetSpec

    cfg = DataConfig(train=DatasetSpec(path=args.records), eval=None, max_length=args.max_length)
    enc, _ = encode_spec(tok, cfg.train, cfg)
    sampler = StepSampler(len(enc), BATCH, 1, 1, 0, SEED)
    order = [i for step in range(len(enc) // BATCH) for i in sampler.global_indices(step)]
    return enc, order


def flops_per_example(config, length: int) -> float:
    """Model FLOPs of one example of `length` tokens, forward + LoRA backward (2x the forward)."""
    d, L = config.hidden_size, config.num_hidden_layers
    inter, heads, kv = config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    per_layer = d * d * 2 + 2 * d * (d // heads) * kv + 3 * d * inter  # q, o, k, v, gate, up, down
    n = L * per_layer + config.vocab_size * d  # + the output projection
    return 2 * (2 * n * length + 4 * L * length * length * d)


def summarize(step_times: list[float], step_tokens: list[int], total_s: float, losses: list[float]) -> dict:
    steady_t, steady_n = sum(step_times[2:]), sum(step_tokens[2:])
    return {"steps": len(step_times), "useful_tokens": sum(step_tokens), "total_s": total_s,
            "tokens_per_s": sum(step_tokens) / total_s,
            "steady_tokens_per_s": steady_n / steady_t if steady_t else None,
            "mean_loss": sum(losses) / len(losses), "last_loss": losses[-1],
            "step_s": [round(t, 3) for t in step_times]}


def side_plain(args, tok, model_dir) -> dict:
    """transformers + PEFT, the plain loop: pad to the longest in the batch, bf16 autocast."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.data.batching import collate_sft

    enc, order = encoded_in_order(args, tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM")).train()
    t_start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    times, tokens, losses = [], [], []
    for s in range(0, len(order), BATCH):
        batch = collate_sft([enc[i] for i in order[s:s + BATCH]], tok.pad_token_id)  # [4, longest]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        tokens.append(int(mask.sum()))
        losses.append(float(loss))
    return summarize(times, tokens, time.perf_counter() - t_start, losses) | {"config": model.config.to_dict()}


def side_trl(args, tok, model_dir, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    enc, order = encoded_in_order(args, tok)
    ds = Dataset.from_list([{"input_ids": enc[i]["input_ids"], "labels": enc[i]["labels"]} for i in order])
    times, tokens, losses, t_begin = [], [], [], [0.0]

    class Sequential(SFTTrainer):  # the examples in the given order (TRL's default sampler shuffles)
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **k)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t_begin[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t_begin[0])

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    extra = {"padding_free": dict(padding_free=True, max_length=None),
             "packing": dict(packing=True, max_length=args.max_length)}.get(variant, dict(max_length=args.max_length))
    out_dir = tempfile.mkdtemp(prefix="sft-trl-")
    config = SFTConfig(output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       logging_steps=1, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
                       dataloader_num_workers=0, use_cpu=True, **extra)  # bf16 (a default) on CPU needs use_cpu
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = Sequential(model=model_dir, args=config, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    res = summarize(times, tokens, time.perf_counter() - t0, losses)
    return res | {"config": trainer.model.config.to_dict(), "gradient_checkpointing": config.gradient_checkpointing,
                  "bf16": config.bf16}


def tunelab_overrides(args, steps: int) -> list[str]:
    """The recipe every tunelab side shares: the data, LoRA and the hyperparameters of the other sides."""
    return [f"model.name_or_path={args.model_dir or 'smollm2-135m-instruct'}", f"data.train.path={args.records}",
            "data.eval=null", f"data.max_length={args.max_length}", "method.name=lora", "method.r=16",
            "method.alpha=32", f"train.batch_size={BATCH}", f"train.max_steps={steps}",
            f"train.lr={LR}", "train.scheduler=constant", "train.warmup_ratio=0", "train.weight_decay=0",
            "train.max_grad_norm=1.0", f"train.seed={SEED}", "train.save_every=null",
            f"output_dir={tempfile.mkdtemp(prefix='sft-tunelab-')}", "name=bench"]


def side_tunelab(args, tok, overrides: list[str]) -> dict:
    from tunelab.runner import open_workspace, prepare_workspace, train_workspace
    from tunelab.validate import load_validated_recipe

    enc, order = encoded_in_order(args, tok)
    shared = tunelab_overrides(args, len(order) // BATCH)
    if any(o.startswith("data.packing=true") for o in overrides):
        shared.append(f"data.pack_length={args.max_length}")
    recipe = load_validated_recipe(None, shared + overrides)
    ws = open_workspace(recipe)
    assert [e["input_ids"] for e in ws.train_data] == [e["input_ids"] for e in enc], "not the same examples"
    prepare_workspace(ws)  # LoRA applied and the engine configured, as TRL's trainer does before train()
    t_start = time.perf_counter()
    times, losses, last = [], [], [t_start]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        losses.append(loss)
        last[0] = now

    model, result, _ = train_workspace(ws, on_step=on_step)
    tokens = [sum(len(enc[i]["input_ids"]) for i in order[s:s + BATCH]) for s in range(0, len(order), BATCH)]
    config = getattr(model, "config", None) or ws.model.config
    return summarize(times, tokens, time.perf_counter() - t_start, losses) | {
        "config": config.to_dict(), "precision": ws.recipe.train.precision, "engine": ws.engine}


def child(args) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import PretrainedConfig

    from tunelab.model import load_tokenizer

    model_cfg, model_dir = model_source(args)
    tok = load_tokenizer(model_cfg)
    side = args.child
    if side == "hf-peft":
        res = side_plain(args, tok, model_dir)
    elif side.startswith("trl-"):
        res = side_trl(args, tok, model_dir, side.removeprefix("trl-").replace("-", "_"))
    else:
        res = side_tunelab(args, tok, side.split("+")[1:])
    enc, order = encoded_in_order(args, tok)
    config = PretrainedConfig.from_dict(res.pop("config"))
    res["flops"] = sum(flops_per_example(config, len(enc[i]["input_ids"])) for i in order)
    return {"side": side, "peak_mb": peak_rss_mb(), **res}


def run(args, data: str, max_length: int, sides: list[str], peak: float) -> list[dict]:
    records = os.path.join(tempfile.mkdtemp(prefix="sft-data-"), f"{data}.jsonl")
    write_records(data, args.n, records)
    rows = []
    for side in sides:
        child_args = ["--data", data, "--max-length", str(max_length), "--n", str(args.n), "--records", records]
        r = run_child(__file__, side, child_args + (["--model-dir", args.model_dir] if args.model_dir else []))
        r.update(side=side, data=data, max_length=max_length, matmul_peak_tflops=peak, load_start=args.load_start,
                 load_end=os.getloadavg()[0], cpu=cpu_info())
        if "error" not in r:
            r["mfu"] = r["flops"] / r["total_s"] / (peak * 1e12)
        rows.append(r)
        print_row(r, None)
        if args.append:
            with open(args.append, "a") as f:
                f.write(json.dumps(r) + "\n")
    return rows


HEADER = (f"{'data':7}{'len':>5}  {'side':45}{'tokens':>7}{'tok/s':>7}{'steady':>8}{'peak MB':>9}{'MFU':>7}"
          f"{'loss':>7}  {'speed vs TRL-def':>17}{'mem':>6}")


def print_row(r: dict, base: dict | None) -> None:
    if "error" in r:
        print(f"{r['data']:7}{r['max_length']:>5}  {r['side']:45}ERROR {r['error']}", flush=True)
        return
    ratio = ""
    if base and "error" not in base and base is not r:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:>16.2f}x{r['peak_mb'] / base['peak_mb']:>5.2f}x"
    steady = f"{r['steady_tokens_per_s']:.0f}" if r.get("steady_tokens_per_s") else "-"
    print(f"{r['data']:7}{r['max_length']:>5}  {r['side']:45}{r['useful_tokens']:>7}{r['tokens_per_s']:>7.0f}"
          f"{steady:>8}{r['peak_mb']:>9.0f}{100 * r['mfu']:>6.1f}%{r['mean_loss']:>7.3f}  {ratio}", flush=True)


def table(rows: list[dict]) -> None:
    """Every (data, max length) group with ratios against TRL's defaults, then the ratios the issue asks for."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["max_length"]), []).append(r)
    print(HEADER)
    for (data, length), rs in groups.items():
        by = {r["side"]: r for r in rs if "error" not in r}
        base = by.get("trl-defaults")
        for r in rs:
            print_row(r, base)
        trl = [by[s] for s in ("trl-padding-free", "trl-packing") if s in by]
        best_trl = max(trl, key=lambda r: r["tokens_per_s"]) if trl else None
        for name in [s for s in by if s.startswith("tunelab")]:
            t = by[name]
            parts = []
            if base:
                parts.append(f"{t['tokens_per_s'] / base['tokens_per_s']:.2f}x TRL-defaults tokens/s at "
                             f"{t['peak_mb'] / base['peak_mb']:.2f}x its peak memory (target >= 3x at <= 0.5x)")
            if best_trl:
                parts.append(f"{t['tokens_per_s'] / best_trl['tokens_per_s']:.2f}x TRL's best ({best_trl['side']}; "
                             "target >= 1.5x)")
            if "hf-peft" in by:
                parts.append(f"{t['tokens_per_s'] / by['hf-peft']['tokens_per_s']:.2f}x HF + PEFT")
            print(f"{'':14}{name}: " + "; ".join(parts))
    peaks = sorted({r["matmul_peak_tflops"] for r in rows})
    print(f"bf16 matmul peak (2048^3) per invocation: {', '.join(f'{p:.2f}' for p in peaks)} TFLOP/s; "
          f"{rows[0]['cpu'] if rows else ''}; load averages {min(r['load_start'] for r in rows):.2f}-"
          f"{max(r['load_end'] for r in rows):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["lima", "alpaca"], choices=["lima", "alpaca", "tiny"])
    ap.add_argument("--max-length", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--n", type=int, default=64, help="records per data set (one epoch of n // 4 steps)")
    ap.add_argument("--sides", nargs="+", default=list(DEFAULT_SIDES))
    ap.add_argument("--quick", action="store_true", help="the tiny random Llama (tests/tiny.py), 16 examples")
    ap.add_argument("--append", help="append each side's result to this JSONL file")
    ap.add_argument("--table", help="print the table of a JSONL file of results and exit")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.max_length = args.max_length[0]
        print(json.dumps(child(args)))
        return
    if args.table:
        with open(args.table) as f:
            table([json.loads(line) for line in f if line.strip()])
        return
    if args.quick:
        args.model_dir = tiny_model_dir("sft-tiny-")
        args.data, args.max_length, args.n = ["tiny"], [64], 16
    args.load_start = os.getloadavg()[0]
    peak = matmul_peak_tflops()
    print(f"{cpu_info()}; bf16 matmul peak (2048^3) {peak:.2f} TFLOP/s; load average {args.load_start:.2f}", flush=True)
    print(HEADER, flush=True)
    rows = [r for data in args.data for length in args.max_length for r in run(args, data, length, args.sides, peak)]
    print()
    table(rows)


if __name__ == "__main__":
    main()
