"""Helpers shared by the benchmarks that measure one configuration per fresh subprocess.

Peak memory on CPU is a per-process high-water mark (`ru_maxrss`), so a fair comparison needs a new process per
configuration: `run_child` starts this same script with `--child NAME ...`, and the child prints one JSON line
(its last line of stdout) with what it measured.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)


def rss_mb() -> float:
    """The current resident set of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def save_tiny_model(path: str | os.PathLike) -> str:
    """The tests' tiny random Llama and its tokenizer saved as an HF directory at `path` (`--quick` runs)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_model_dir(prefix: str) -> str:
    """A fresh temporary directory holding the tests' tiny random Llama and its tokenizer (`--quick` runs)."""
    import tempfile

    return save_tiny_model(tempfile.mkdtemp(prefix=prefix))


def peak_rss_mb() -> float:
    """The lifetime peak resident set of this process (ru_maxrss), MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def child_env() -> dict[str, str]:
    """The parent's environment (OMP_NUM_THREADS as set: unset = torch's default, every core), src/ on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_child(script: str, name: str, args: list[str], timeout: float | None = None,
              cpu_limit: int | None = None) -> dict:
    """Run `python script --child name *args` in a fresh process; returns its JSON line, or
    {"name": name, "error": "..."} when it fails, times out or prints no JSON.

    `cpu_limit` (seconds of CPU time, RLIMIT_CPU) bounds a child independently of how busy a shared machine is;
    `timeout` is wall-clock."""
    cmd = [sys.executable, script, "--child", name, *args]

    def limit_cpu():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout,
                             preexec_fn=limit_cpu if cpu_limit else None)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s (wall clock)"}
    if cpu_limit and out.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return {"name": name, "error": f"stopped at the CPU-time limit of {cpu_limit} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    return {"name": name, "error": last_error_line(out.stderr) or f"exit code {out.returncode}",
            "stderr_tail": out.stderr[-3000:]}


def last_error_line(stderr: str) -> str:
    """The exception line of a traceback (`SomeError: message`), else the last non-empty line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Unsupported", "Diverged", "Missing")) and " " not in head:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def matmul_peak_tflops(device=None, n: int = 2048, reps: int = 10) -> float:
    """bf16 [n, n] x [n, n] matmul throughput on `device` (default CPU): the peak MFU is measured against."""
    import time

    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def cpu_info() -> str:
    """torch's CPU capability and the /proc/cpuinfo flags that decide bf16 speed (AVX-512 bf16, AMX), threads."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, flags {' '.join(have)}, "
            f"threads {torch.get_num_threads()}")
