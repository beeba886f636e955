"""Start-up cost of a process, with and without bitsandbytes imported (core/deferred.py), in one run.

Each configuration runs in fresh processes (imports are per process), `--repeats` times, alternating:
  help      `python -m tunelab.cli --help`
  tiny_run  `python -m tunelab.cli run` on the tiny random Llama of tests/tiny.py (LoRA r4, 1 step, no evaluation,
            no export): the start-up of a run plus one step
  import    `import tunelab, peft` and LoRA added to the tiny model (wrap_peft): the start-up of a LoRA run alone
`baseline` imports bitsandbytes first, as `import peft` did before core/deferred.py (peft/helpers.py imports it;
for `help`, which imports neither, baseline = ours); `ours` is tunelab as it is. Printed: the median CPU seconds
(user + sys of the child) and wall seconds of each, and ours / baseline. CPU time is the steadier figure on a
shared machine. Writes --out (JSON) with every sample.

    python benchmarks/startup.py --repeats 5 --out startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SRC, child_env, save_tiny_model

BASELINE_PRELUDE = "import bitsandbytes  # what `import peft` did before tunelab deferred it\n"
WRAP = """
import tunelab, peft
from tunelab.methods.lora import LoRAOptions, lora_peft_config, wrap_peft
from tunelab.model import load_model
from tunelab.recipe import ModelConfig
wrap_peft(load_model(ModelConfig(name_or_path={model!r})), lora_peft_config(LoRAOptions(r=4)))
"""
CLI = "import runpy, sys\nsys.argv = ['tunelab'] + {args!r}\nrunpy.run_module('tunelab.cli', run_name='__main__')\n"


def measure(code: str, cwd: Path) -> dict[str, float]:
    """CPU (user + sys) and wall seconds of one fresh `python -c code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{code}\n{res.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": wall, "notice": "gemm_4bit_forward" in res.stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=["help", "import", "tiny_run"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    model = Path(save_tiny_model(work / "tiny"))
    recipe = work / "tiny.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "output_dir": str(work / "runs"), "model": {"name_or_path": str(model)},
        "data": {"train": {"builtin": "date_format", "n": 8}, "eval": None, "max_length": 96},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
        "eval": {"before": False, "after": False, "exact_match": False},
        "export": {"adapter": False, "merged": False}}))
    n_run = [0]

    def tiny_run() -> str:
        n_run[0] += 1
        return CLI.format(args=["run", str(recipe), f"name=tiny{n_run[0]}"])

    cases = {"help": lambda: CLI.format(args=["--help"]), "import": lambda: WRAP.format(model=str(model)),
             "tiny_run": tiny_run}
    samples: dict[str, dict[str, list]] = {}
    for name in args.only:
        for _ in range(args.repeats):
            # --help imports neither torch nor peft: the same code on both sides (a check that nothing changed)
            for side, prelude in (("baseline", "" if name == "help" else BASELINE_PRELUDE), ("ours", "")):
                got = measure(prelude + cases[name](), work)
                samples.setdefault(f"{name}/{side}", {}).setdefault("cpu_s", []).append(got["cpu_s"])
                samples[f"{name}/{side}"].setdefault("wall_s", []).append(got["wall_s"])
                samples[f"{name}/{side}"].setdefault("notice", []).append(got["notice"])
    print(f"src: {os.path.abspath(SRC)}; {args.repeats} alternating repeats; medians")
    print(f"{'case':<10} {'baseline cpu s':>15} {'ours cpu s':>11} {'ratio':>6} {'baseline wall s':>16} "
          f"{'ours wall s':>12} {'ratio':>6}  kernels notice (baseline/ours)")
    summary = {}
    for name in args.only:
        b, o = samples[f"{name}/baseline"], samples[f"{name}/ours"]
        row = {k: (statistics.median(b[k]), statistics.median(o[k])) for k in ("cpu_s", "wall_s")}
        summary[name] = {**{f"{k}_{s}": v[i] for k, v in row.items() for i, s in enumerate(("baseline", "ours"))},
                         "cpu_ratio": row["cpu_s"][1] / row["cpu_s"][0],
                         "wall_ratio": row["wall_s"][1] / row["wall_s"][0]}
        print(f"{name:<10} {row['cpu_s'][0]:>15.2f} {row['cpu_s'][1]:>11.2f} {summary[name]['cpu_ratio']:>6.2f} "
              f"{row['wall_s'][0]:>16.2f} {row['wall_s'][1]:>12.2f} {summary[name]['wall_ratio']:>6.2f}  "
              f"{any(b['notice'])}/{any(o['notice'])}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
