"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (torchrun, gloo on CPU; DeepSpeed picks its CPU accelerator when
there is no GPU) against 1 process, through `tunelab train`; a ZeRO checkpoint resumes exactly.

Same recipes as test_fsdp_multiprocess.py (dist_util: 10 steps, global batch 4). Tolerances: losses within rel
1e-5 (fp32; measured ~1e-7: ZeRO reduces gradients in buckets, a different summation order than one process);
merged weights of full fine-tuning within 2e-3 after 10 AdamW steps at lr 1e-3 (a gradient element that is ~0
in one run can be rounding noise of either sign in the other, and AdamW turns either into a step of up to lr:
the bound is 2 lr, two such steps of opposite sign; measured 7e-6); LoRA adapters in bf16: see that test.
"""

from __future__ import annotations

import pytest
import torch
from dist_util import (
    CRASH_RUN,
    Runs,
    cli,
    export_tensors,
    losses,
    max_abs_diff,
    max_abs_loss_diff,
    max_rel_diff,
    run,
    torchrun,
)

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

TOL = {"loss": 1e-5, "weights": 2e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    return Runs(tmp_path_factory.mktemp("zero"), tiny_model_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_processes_equals_one_process(runs, stage):
    one = runs.get("one-full", "full", 1)
    two = runs.get(f"zero{stage}-full", "full", 2, "distributed.backend=deepspeed",
                   f"distributed.deepspeed.zero_stage={stage}")
    loss_diff = max_rel_diff(losses(one), losses(two))
    weight_diff = max_abs_diff(export_tensors(one, "merged"), export_tensors(two, "merged"))
    print(f"\nZeRO-{stage} full fp32, 2 processes vs 1, 10 steps: loss max rel diff {loss_diff:.2e}, merged max abs "
          f"diff {weight_diff:.2e}")
    assert loss_diff <= TOL["loss"] and weight_diff <= TOL["weights"]
    assert (two / "checkpoints" / "step-000010" / "deepspeed").is_dir()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "export" / "merged")  # a plain HF checkpoint


def test_zero3_lora_exports_an_adapter_equal_to_the_unsharded_one(runs, tiny_model_dir):
    """bf16 autocast, frozen weights in bf16. ZeRO-3 holds lm_head's weight only inside its own forward, so the loss
    goes through the module (full logits) instead of the chunked cross-entropy, whose gradients agree with it only
    to bf16 rounding: the 1-process reference takes the same path (`objective.chunk_size=0`). Bound: 5e-3, half
    an AdamW step at lr 1e-2 (measured 1.6e-3)."""
    one = runs.get("one-lora-naive", "lora", 1, "objective.chunk_size=0")
    two = runs.get("zero3-lora", "lora", 2, "distributed.backend=deepspeed", "distributed.deepspeed.zero_stage=3")
    loss_diff = max_rel_diff(losses(one), losses(two))
    diff = max_abs_diff(export_tensors(one, "adapter"), export_tensors(two, "adapter"))
    print(f"\nZeRO-3 LoRA bf16: loss max rel diff {loss_diff:.2e}, adapter max abs diff {diff:.2e}")
    assert loss_diff <= 2e-3 and diff <= 5e-3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two / "export" / "adapter")


def test_zero3_crash_and_resume_continue_exactly(runs):
    extra = ("distributed.backend=deepspeed", "distributed.deepspeed.zero_stage=3", "method.dropout=0.1")
    whole = runs.get("zero3-lora-dropout", "lora", 2, *extra)
    crashed = runs.dir("zero3-lora-crash")
    res = run(torchrun(2, CRASH_RUN, runs.recipe("lora"), "6", "name=zero3-lora-crash", "train.grad_accum=1", *extra),
              ok=False)
    assert res.returncode != 0 and (crashed / "checkpoints" / "latest").read_text().strip() == "step-000004"
    out = run(torchrun(2, *cli("train", str(crashed))))
    assert "resumed from" in out.stdout + out.stderr
    a, b = export_tensors(whole, "adapter"), export_tensors(crashed, "adapter")
    print(f"\nZeRO-3 crash + resume: loss max abs diff {max_abs_loss_diff(losses(whole), losses(crashed)):.2e}, "
          f"adapter max abs diff {max_abs_diff(a, b):.2e}")
    assert losses(crashed) == losses(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_checkpoints_resume_only_on_the_same_number_of_processes(runs):
    two = runs.get("zero3-lora-dropout", "lora", 2, "distributed.backend=deepspeed",
                   "distributed.deepspeed.zero_stage=3", "method.dropout=0.1")
    res = run([*torchrun(1, *cli("train", str(two), "train.max_steps=12", "train.grad_accum=2"))], ok=False)
    assert res.returncode != 0
    assert "holds ZeRO-3 partitions of 2 processes; resume it on as many" in res.stdout + res.stderr
