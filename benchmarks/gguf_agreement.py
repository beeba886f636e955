"""GGUF export vs the merged HF model, judged by llama.cpp itself (llama-cpp-python): the figures of docs/export.md.

    python benchmarks/gguf_agreement.py RUN_DIR [--n 100] [--quants f16 q8_0] [--json out.json]

For a run directory with `export/merged` (e.g. `tunelab run quickstart`): writes the GGUF files (if missing) under
`export/gguf/`, then on the first `--n` held-out prompts of the run's eval task compares greedy generations of
the merged HF model (float32, transformers) and of llama.cpp on each GGUF, from the same prompt token ids:
identical generations, exact match by the task's checker, stop rate, file size, and whether llama.cpp's own
tokenizer gives the HF prompt ids. Needs llama-cpp-python (`pip install llama-cpp-python`, compiles llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's eval.max_new_tokens")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores; 1 on a busy "
                    "machine, where its spinning threads lose to the other processes)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import llamacpp
    from tunelab.data.pipeline import eval_items
    from tunelab.evaluate.tasks import checker_for
    from tunelab.export_gguf import write_gguf
    from tunelab.recipe import load_recipe

    recipe = load_recipe(args.run_dir / "recipe.yaml")
    merged = args.run_dir / "export" / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    items = eval_items(recipe.data.eval.model_copy(update={"n": args.n}), recipe.data)[: args.n]
    max_new = args.max_new_tokens or recipe.eval.max_new_tokens
    print(f"{len(items)} held-out prompts of {items[0].task}, max_new_tokens {max_new}, torch threads "
          f"{torch.get_num_threads()}")
    results = {}
    for quant in args.quants:
        path = args.run_dir / "export" / "gguf" / f"model-{quant}.gguf"
        if not path.is_file():
            write_gguf(merged, path, quant=quant, tokenizer=tok)
        t0 = time.perf_counter()
        llm = llamacpp.load(path, n_threads=args.threads)
        rows = llamacpp.compare_with_hf(model, tok, llm, [it.messages for it in items], max_new)

        def em(key: str) -> float:
            return sum(bool(checker_for(it.task)(tok.decode(r[key], skip_special_tokens=True), it.answer))
                       for it, r in zip(items, rows)) / len(rows)

        results[quant] = {
            "file_mb": path.stat().st_size / 2**20, "n": len(rows),
            "identical": sum(r["hf"] == r["gguf"] for r in rows),
            "exact_match_hf": em("hf"), "exact_match_gguf": em("gguf"),
            "stop_rate_hf": sum(r["hf_stopped"] for r in rows) / len(rows),
            "stop_rate_gguf": sum(r["gguf_stopped"] for r in rows) / len(rows),
            "same_prompt_tokens": sum(r["same_prompt_tokens"] for r in rows), "seconds": time.perf_counter() - t0,
        }
        r = results[quant]
        print(f"{quant:>5}: {r['file_mb']:.1f} MB, identical generations {r['identical']}/{r['n']}, exact match "
              f"{100 * r['exact_match_gguf']:.1f}% (HF {100 * r['exact_match_hf']:.1f}%), stop rate "
              f"{100 * r['stop_rate_gguf']:.0f}% (HF {100 * r['stop_rate_hf']:.0f}%), llama.cpp tokenizer = HF on "
              f"{r['same_prompt_tokens']}/{r['n']} prompts ({r['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
