"""`precision: auto`: the decision for each kind of hardware, fed its capability (no such hardware needed),
and a tiny run resolving `auto` on a faked AVX2-only CPU trains and evaluates in fp32 end to end."""

import pytest
import torch
from tiny import tiny_recipe_dict

from tunelab.core import precision as P
from tunelab.core.precision import Capability, cpu_capability, cuda_capability, explain_precision, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2_FLAGS = {"fpu", "sse4_2", "avx", "avx2", "fma"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize("flags, isa, want, name", [
    (AVX2_FLAGS, "AVX2", "fp32", "avx2"),  # laptops, many servers: bf16 emulated
    (AVX512_FLAGS, "AVX512", "fp32", "avx512"),  # AVX-512 without its BF16 extension (Skylake-SP)
    (AVX512_FLAGS | {"avx512_bf16"}, "AVX512", "bf16", "avx512_bf16"),  # Zen 4, Cooper Lake
    (AVX512_FLAGS | {"avx512_bf16", "amx_tile", "amx_bf16"}, "AVX512", "bf16", "amx"),  # Sapphire Rapids
    ({"fp", "asimd", "sve", "bf16"}, "SVE256", "bf16", "bf16"),  # AArch64 with BF16 (Graviton 3)
    ({"fp", "asimd"}, "NEON", "fp32", "neon"),
])
def test_cpu_decision(flags, isa, want, name):
    cap = cpu_capability(flags, isa)
    assert cap.name == name
    assert resolve_precision("auto", CPU, cap) == want


@pytest.mark.parametrize("sm, want", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"),
                                      ((5, 2), "fp32")])
def test_cuda_decision(sm, want):
    assert resolve_precision("auto", CUDA, cuda_capability(*sm, "GPU")) == want


def test_explicit_precision_is_kept_and_the_reason_says_why():
    avx2 = cpu_capability(AVX2_FLAGS, "AVX2")
    assert explain_precision("auto", CPU, avx2) == ("fp32", "auto: this CPU has no native bf16: avx2")
    assert "fp16 with loss scaling" in explain_precision("auto", CUDA, cuda_capability(7, 5, "T4"))[1]
    for p in ("bf16", "fp16", "fp32"):
        assert resolve_precision(p, CPU, avx2) == p
    assert "emulated" in explain_precision("bf16", CPU, avx2)[1]
    assert explain_precision("bf16", CPU, cpu_capability({"amx_bf16"}, "AVX512"))[1] == "as asked"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("bf17", CPU, avx2)


def test_autocast_context_resolves_auto(monkeypatch):
    monkeypatch.setattr(P, "detect_capability", lambda device: Capability("cpu", bf16=False, name="avx2"))
    with P.autocast_context(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(P, "detect_capability", lambda device: Capability("cpu", bf16=True, name="amx"))
    with P.autocast_context(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_this_machine_is_detected():
    cap = P.detect_capability("cpu")
    assert cap.device_type == "cpu" and cap.name
    assert resolve_precision("auto", CPU) in ("bf16", "fp32")


def test_auto_on_an_avx2_cpu_runs_fp32_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    monkeypatch.setattr(P, "detect_capability", lambda device: cpu_capability(AVX2_FLAGS, "AVX2"))
    seen = []
    real = P.autocast_context

    def spy(device, precision):  # every forward of training and evaluation goes through here
        seen.append(precision)
        return real(device, precision)

    monkeypatch.setattr(P, "autocast_context", spy)
    monkeypatch.setattr("tunelab.train.loop.autocast_context", spy)
    import tunelab.evaluate.tasks as tasks

    real_generate = tasks.generate

    def generate_spy(model, tokenizer, prompts, cfg, **kw):  # evaluation's generations: the engine's precision
        seen.append(cfg.precision)
        return real_generate(model, tokenizer, prompts, cfg, **kw)

    monkeypatch.setattr(tasks, "generate", generate_spy)
    import tunelab.train.engine as engine

    applied = {}
    real_engine = engine.configure_engine
    monkeypatch.setattr(engine, "configure_engine", lambda *a, **k: applied.update(real_engine(*a, **k)) or applied)
    d = tiny_recipe_dict(tiny_model_dir, tmp_path, train={"precision": "auto", "max_steps": 2,
                                                          "frozen_dtype": "auto", "attention": "auto"},
                         objective={"name": "sft", "chunk_size": 16})
    recipe = Recipe.model_validate(d)
    assert recipe.train.precision == "auto"
    summary = run_recipe(recipe, do_export=False)
    out = capsys.readouterr().out
    assert "precision: fp32 (auto: this CPU has no native bf16: avx2)" in out
    assert summary["precision"] == "fp32"
    assert seen and set(seen) == {"fp32"}  # resolved once at the start: nothing downstream sees `auto`
    assert all(torch.isfinite(torch.tensor([summary["final_train_loss"]])))
    # frozen_dtype auto under fp32: nothing cast; attention auto under fp32: sdpa, computing in fp32
    assert applied["frozen_params_cast"] == 0 and applied["attention"] == "sdpa"
    import json
    from pathlib import Path

    run_dir = Path(summary["run_dir"])
    assert "precision: auto" in (run_dir / "recipe.yaml").read_text()  # saved as asked, resolved per machine
    assert json.loads((run_dir / "eval_after.json").read_text())
