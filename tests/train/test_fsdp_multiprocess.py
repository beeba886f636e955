"""FSDP2 on 2 processes (torchrun, gloo on CPU) against 1 process, through `tunelab train`.

The 1-process reference accumulates 2 micro-batches of 2 examples; 2 processes take 1 micro-batch of 2 each:
the same global batch of 4, the same examples (StepSampler), so the same gradient up to summation order.
Tolerances (10 steps): losses within rel 1e-5 in fp32 and 2e-3 in bf16 autocast (frozen weights stored in bf16,
chunked cross-entropy); weights within 1e-4 after 10 AdamW steps in fp32 (AdamW divides each gradient element
by its own running RMS, so where a gradient is ~0 the summation-order rounding can move the update by a
visible fraction of lr), 2e-3 in bf16. On this machine the fp32 runs come out bit-identical.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from dist_util import (
    CRASH_RUN,
    STEPS,
    Runs,
    cli,
    env,
    export_tensors,
    free_port,
    losses,
    max_abs_diff,
    max_abs_loss_diff,
    max_rel_diff,
    one_process,
    run,
    torchrun,
)

pytestmark = pytest.mark.slow

TOL = {"bf16": {"loss": 2e-3, "weights": 2e-3}, "fp32": {"loss": 1e-5, "weights": 1e-4}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    return Runs(tmp_path_factory.mktemp("fsdp"), tiny_model_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind,precision", [("lora", "bf16"), ("full", "fp32")])
def test_fsdp_on_two_processes_equals_one_process(runs, kind, precision, tiny_model_dir):
    """`tunelab run` for LoRA: evaluation (held-out loss, greedy generation for exact match) runs under sharding
    on every process in lockstep and gives the unsharded run's numbers."""
    extra = ("eval.after=true",) if kind == "lora" else ()
    command = "run" if kind == "lora" else "train"
    one = runs.get(f"one-{kind}", kind, 1, *extra, command=command)  # ddp, one process: no wrapper at all
    two = runs.get(f"fsdp-{kind}", kind, 2, "distributed.backend=fsdp", *extra, command=command)
    tol = TOL[precision]
    if kind == "lora":
        import json

        after = [json.loads((r / "eval_after.json").read_text()) for r in (one, two)]
        print(f"\nfsdp lora: eval_loss {after[0]['eval_loss']:.6f} vs {after[1]['eval_loss']:.6f}, exact match "
              f"{after[0]['exact_match']} vs {after[1]['exact_match']}")
        assert after[1]["eval_loss"] == pytest.approx(after[0]["eval_loss"], rel=tol["loss"])
        assert after[1]["exact_match"] == after[0]["exact_match"]
    assert len(losses(two)) == STEPS
    print(f"\nfsdp {kind} {precision}: 2 processes vs 1, {STEPS} steps: loss max rel diff "
          f"{max_rel_diff(losses(one), losses(two)):.2e}")
    assert max_rel_diff(losses(one), losses(two)) <= tol["loss"]
    assert (two / "checkpoints" / "step-000010" / "shards" / ".metadata").is_file()  # a sharded checkpoint
    # the export gathers the full weights: equal to the unsharded run's, loadable as usual
    from transformers import AutoModelForCausalLM

    kinds = ["adapter", "merged"] if kind == "lora" else ["merged"]
    for k in kinds:
        diff = max_abs_diff(export_tensors(one, k), export_tensors(two, k))
        print(f"fsdp {kind} {precision}: {k} export max abs diff {diff:.2e}")
        assert diff <= tol["weights"], k
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = {r: AutoModelForCausalLM.from_pretrained(r / "export" / "merged") for r in (one, two)}
    torch.testing.assert_close(_logits(merged[one], ids), _logits(merged[two], ids), rtol=0, atol=50 * tol["weights"])
    if kind == "lora":
        from peft import PeftModel

        adapted = {r: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                r / "export" / "adapter") for r in (one, two)}
        torch.testing.assert_close(_logits(adapted[one], ids), _logits(adapted[two], ids), rtol=0,
                                   atol=50 * tol["weights"])
        torch.testing.assert_close(_logits(adapted[two], ids), _logits(merged[two], ids), rtol=0, atol=1e-4)


def test_fsdp_crash_and_resume_continue_exactly(runs):
    """Dropout on (the RNG of every process matters); bf16 autocast; the crash comes after step 6, so the run
    resumes from the sharded checkpoint of step 4 and must reproduce steps 5-10 bit for bit."""
    extra = ("distributed.backend=fsdp", "method.dropout=0.1")
    whole = runs.get("fsdp-lora-dropout", "lora", 2, *extra)
    crashed = runs.dir("fsdp-lora-crash")
    res = run(torchrun(2, CRASH_RUN, runs.recipe("lora"), "6", "name=fsdp-lora-crash", "train.grad_accum=1", *extra),
              ok=False)
    assert res.returncode != 0 and (crashed / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not (crashed / "checkpoints" / "step-000008").exists()
    res = run(torchrun(2, *cli("train", str(crashed))))
    assert "resumed from" in res.stdout + res.stderr
    from tunelab.train.restore import read_checkpoint

    a = read_checkpoint(whole / "checkpoints" / "step-000010")["trainable"]  # gathered whole from the shards
    b = read_checkpoint(crashed / "checkpoints" / "step-000010")["trainable"]
    print(f"\nfsdp crash + resume: loss max abs diff {max_abs_loss_diff(losses(whole), losses(crashed)):.2e}, "
          f"trainable max abs diff {max_abs_diff(a, b):.2e}")
    assert losses(crashed) == losses(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_fsdp_resumes_on_another_number_of_processes(runs, before, after):
    """The sharded checkpoint of step 4 written by `before` processes re-shards onto `after` (global batch kept:
    grad_accum = 2 / processes); the resumed run equals the uninterrupted run (fp32, full fine-tuning: every
    weight and its AdamW moments re-sharded)."""
    reference = runs.get("one-full", "full", 1) if before == 1 else runs.get("fsdp-full", "full", 2,
                                                                             "distributed.backend=fsdp")
    name = f"reshard-{before}-{after}"
    args = [CRASH_RUN, runs.recipe("full"), "6", f"name={name}", f"train.grad_accum={2 // before}",
            "distributed.backend=fsdp"]
    run(one_process(*args) if before == 1 else torchrun(before, *args), ok=False)
    assert (runs.dir(name) / "checkpoints" / "latest").read_text().strip() == "step-000004"
    resume = cli("train", str(runs.dir(name)), f"train.grad_accum={2 // after}")
    out = run(one_process(*resume) if after == 1 else torchrun(after, *resume))
    assert "resumed from" in out.stdout + out.stderr
    loss_diff = max_rel_diff(losses(reference), losses(runs.dir(name)))
    weight_diff = max_abs_diff(export_tensors(reference, "merged"), export_tensors(runs.dir(name), "merged"))
    print(f"\nre-sharded resume {before} -> {after}: loss max rel diff {loss_diff:.2e}, merged max abs diff "
          f"{weight_diff:.2e}")
    assert loss_diff <= TOL["fp32"]["loss"] and weight_diff <= TOL["fp32"]["weights"]


def test_two_nodes_on_loopback_equal_two_processes_on_one_node(runs, tiny_model_dir):
    """torchrun --nnodes 2 --node_rank 0/1 --master_addr 127.0.0.1: one process per "machine"."""
    reference = runs.get("fsdp-full", "full", 2, "distributed.backend=fsdp")
    port = free_port()
    args = cli("train", runs.recipe("full"), "name=two-nodes", "train.grad_accum=1", "distributed.backend=fsdp")
    nodes = [subprocess.Popen(torchrun(1, *args, port=port, nnodes=2, node_rank=r), env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    weight_diff = max_abs_diff(export_tensors(reference, "merged"), export_tensors(runs.dir("two-nodes"), "merged"))
    print(f"\ntwo nodes on loopback vs one node: loss max abs diff "
          f"{max_abs_loss_diff(losses(reference), losses(runs.dir('two-nodes'))):.2e}, merged max abs diff "
          f"{weight_diff:.2e}")
    assert losses(runs.dir("two-nodes")) == losses(reference)
    assert weight_diff == 0


def test_fsdp_options_train_like_the_defaults(runs):
    """Keeping gathered weights until backward, recomputing activations and offloading to CPU change where
    memory goes, not the numbers; bf16 gathers (MixedPrecisionPolicy) change them by bf16 rounding."""
    reference = runs.get("fsdp-full", "full", 2, "distributed.backend=fsdp")
    mixed = runs.get("fsdp-bf16-gather", "full", 2, "distributed.backend=fsdp",
                     "distributed.fsdp.param_dtype=bfloat16", "distributed.fsdp.reduce_dtype=float32")
    same = runs.get("fsdp-options", "full", 2, "distributed.backend=fsdp",
                    "distributed.fsdp.reshard_after_forward=false", "distributed.fsdp.activation_checkpointing=true",
                    "distributed.fsdp.cpu_offload=true")
    print(f"\nfsdp options: loss max rel diff {max_rel_diff(losses(reference), losses(same)):.2e}; bf16 gathers "
          f"{max_rel_diff(losses(reference), losses(mixed)):.2e}")
    assert max_rel_diff(losses(reference), losses(same)) <= TOL["fp32"]["loss"]
    assert max_rel_diff(losses(reference), losses(mixed)) <= 2e-2
