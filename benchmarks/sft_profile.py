"""Where a tunelab SFT step's seconds and peak bytes go: the shipped defaults on LIMA (sft_throughput.py's data).

    python benchmarks/sft_profile.py                          # LIMA, max length 512, as shipped
    python benchmarks/sft_profile.py --max-length 1024 train.compile=true   # recipe overrides after the options
    python benchmarks/sft_profile.py --quick                  # the tiny random Llama: a check
    python benchmarks/sft_profile.py --matmuls                # bf16 matmul rates of the model's shapes

The same data, order, LoRA and hyperparameters as `sft_throughput.py`'s tunelab side. It trains `--warmup` steps,
then profiles `--steps` steps with torch.profiler and prints:
  * time: the operators by self CPU time (top 25), and the step's time by kind (matmuls, attention, the chunked
    cross-entropy, dtype copies, elementwise, optimizer, ...), as shares of the profiled CPU time;
  * memory: the process's resident set after loading, after LoRA + the engine's switches, and its peak; the bytes
    saved for backward in one step (torch.autograd.graph.saved_tensors_hooks, counted once per storage, weights
    apart), grouped by dtype and shape, so the activations that set the peak are named.
Proportions are what matter here; the profiler's own overhead makes absolute times slower than the benchmark's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sft_throughput as st  # noqa: E402
from _common import cpu_info, peak_rss_mb, rss_mb, tiny_model_dir  # noqa: E402

KINDS = [  # (kind, substrings of the operator name), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention softmax/mask", ("softmax", "masked_fill", "aten::tril", "scaled_dot_product")),
    ("dtype copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
    ("cross-entropy", ("log_softmax", "logsumexp", "aten::exp", "nll_loss", "aten::gather", "aten::scatter")),
    ("optimizer", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("norm", ("rsqrt", "aten::pow", "aten::mean", "aten::var")),
    ("activation (silu)", ("silu",)),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::cat", "aten::sum",
                     "aten::fill_", "aten::zero_", "aten::cos", "aten::sin")),
    ("memory (alloc/views)", ("aten::empty", "aten::view", "aten::reshape", "aten::transpose", "aten::expand",
                              "aten::slice", "aten::select", "aten::as_strided", "aten::permute", "aten::t",
                              "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::chunk", "aten::narrow",
                              "aten::detach", "aten::_unsafe_view", "aten::resize_", "aten::embedding")),
]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


class SavedTensors:
    """Bytes saved for backward, per storage (a tensor saved twice counts once), weights apart."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.reset()

    def reset(self) -> None:
        self.seen: dict[int, tuple[int, str, tuple]] = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.seen:
            self.seen[s.data_ptr()] = (s.nbytes(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
        return t

    def report(self) -> None:
        acts = {k: v for k, v in self.seen.items() if k not in self.params}
        weights = sum(v[0] for k, v in self.seen.items() if k in self.params)
        groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for nbytes, dtype, shape in acts.values():
            g = groups[(dtype, shape)]
            g[0] += nbytes
            g[1] += 1
        total = sum(v[0] for v in acts.values())
        print(f"\nsaved for backward in one step: {total / 2**20:.0f} MB of activations in {len(acts)} storages "
              f"(+ {weights / 2**20:.0f} MB of weights, held anyway)")
        print(f"{'dtype':10}{'shape':28}{'count':>6}{'MB':>9}{'share':>7}")
        for (dtype, shape), (nbytes, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]:
            print(f"{dtype:10}{str(list(shape)):28}{count:>6}{nbytes / 2**20:>9.1f}{100 * nbytes / total:>6.1f}%")


def matmul_rates(tokens: int = 2048, reps: int = 20) -> None:
    """bf16 matmul TFLOP/s on SmolLM2-135M's training shapes (4 x 512 tokens) against the 2048^3 peak."""
    import torch

    d, kv, inter, vocab, r = 576, 192, 1536, 49152, 16
    shapes = {"2048^3 (the peak)": (2048, 2048, 2048), "q / o  [T,576]x[576,576]": (tokens, d, d),
              "k / v  [T,576]x[576,192]": (tokens, d, kv), "gate / up [T,576]x[576,1536]": (tokens, d, inter),
              "down  [T,1536]x[1536,576]": (tokens, inter, d), "head chunk [256,576]x[576,49152]": (256, d, vocab),
              "LoRA A [T,576]x[576,16]": (tokens, d, r), "LoRA B [T,16]x[16,1536]": (tokens, r, inter),
              "attention [1536,64]x[64,512] x12": (12 * 1536, 64, 512)}
    print(f"{'matmul (bf16)':36}{'TFLOP/s':>9}")
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        print(f"{name:36}{2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="lima", choices=["lima", "alpaca", "tiny"])
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--first", action="store_true",
                    help="profile the training call's start and its first step instead (what the first step pays)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--matmuls", action="store_true", help="only the bf16 matmul rates of the model's shapes")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for tunelab's side (K=V)")
    args = ap.parse_args()
    if args.matmuls:
        print(cpu_info())
        matmul_rates()
        return
    args.model_dir = None
    if args.quick:
        args.model_dir = tiny_model_dir("sft-tiny-")
        args.data, args.max_length, args.n = "tiny", 64, 16
    args.records = os.path.join(tempfile.mkdtemp(prefix="sft-data-"), f"{args.data}.jsonl")
    st.write_records(args.data, args.n, args.records)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from tunelab.model import load_tokenizer
    from tunelab.runner import open_workspace, prepare_workspace, train_workspace
    from tunelab.validate import load_validated_recipe

    print(f"{cpu_info()}; data {args.data}, max length {args.max_length}; overrides {args.overrides or 'none'}")
    rss = {"imports": rss_mb()}
    model_cfg, _ = st.model_source(args)
    tok = load_tokenizer(model_cfg)
    enc, order = st.encoded_in_order(args, tok)
    total = 1 if args.first else args.warmup + args.steps
    recipe = load_validated_recipe(None, st.tunelab_overrides(args, total) + args.overrides)
    ws = open_workspace(recipe)
    rss["model loaded"] = rss_mb()
    prepare_workspace(ws)
    rss["LoRA + engine"] = rss_mb()
    saved = SavedTensors(ws.model)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    wall = [time.perf_counter(), 0.0]
    if args.first:
        args.warmup, args.steps = 0, 1
        prof.start()

    def on_step(step: int, loss: float) -> None:
        if step == args.warmup and not args.first:
            saved.reset()
            wall[0] = time.perf_counter()
            prof.start()
        if step == args.warmup + 1:
            saved.report()
        if step == total:
            wall[1] = time.perf_counter()
            prof.stop()

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        train_workspace(ws, on_step=on_step)
    rss["peak"] = peak_rss_mb()

    events = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in events)
    what = "the start and first step" if args.first else f"{args.steps} steps"
    print(f"\nprofiled {what} ({wall[1] - wall[0]:.2f} s wall): {cpu_total / 1e6:.2f} s of operator self time "
          f"({cpu_total / 1e6 / args.steps:.2f} s per step); tokens per step "
          f"{sum(len(enc[i]['input_ids']) for i in order[:4]):,} (first batch)")
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"{'kind':26}{'share':>7}")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:26}{100 * t / cpu_total:>6.1f}%")
    print(f"\n{'operator':40}{'calls':>7}{'self s':>9}{'share':>7}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]:
        t = e.self_cpu_time_total
        print(f"{e.key[:39]:40}{e.count:>7}{t / 1e6:>9.3f}{100 * t / cpu_total:>6.1f}%")
    print("\nresident set (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))


if __name__ == "__main__":
    main()
