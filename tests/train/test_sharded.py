"""Sharded training in one process and the checks around it: FSDP2 on a one-member process group trains like
DDP and writes a sharded (DCP) checkpoint that `tunelab eval` reads whole and DDP resumes; the unsharded twin
export fills; recipe checks (methods that do not shard, options that do not go together, the DeepSpeed config
pass-through). The multi-process proofs are in test_fsdp_multiprocess.py / test_deepspeed_multiprocess.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from tiny import build_tiny_model, tiny_recipe_dict

from tunelab.recipe import Recipe, RecipeError, load_recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from tunelab.train.restore import read_checkpoint
from tunelab.train.skeleton import materialize, meta_skeleton
from tunelab.validate import load_validated_recipe


@pytest.fixture()
def process_group():
    """FSDP2 creates a one-member process group in one process; remove it afterwards (other tests expect none)."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _peft_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(build_tiny_model(256), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                            task_type="CAUSAL_LM"))


def test_the_skeleton_costs_nothing_and_becomes_the_model():
    model = _peft_model()
    skel = meta_skeleton(model)
    assert all(p.is_meta for p in skel.parameters())
    assert [(n, p.shape, p.requires_grad) for n, p in skel.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in model.named_parameters()]
    full = materialize(skel, {k: v.clone() for k, v in model.state_dict().items()})
    base = full.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied again
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(KeyError, match="lacks parameters"):
        materialize(meta_skeleton(model), {})


def _recipe(model_dir, out, backend, **train):
    return Recipe.model_validate(tiny_recipe_dict(
        model_dir, out, name=backend, distributed={"backend": backend}, eval={"before": False, "after": False},
        train={"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 2, **train}))


def test_fsdp_in_one_process_trains_like_ddp_and_ddp_resumes_its_sharded_checkpoint(tiny_model_dir, tmp_path,
                                                                                     process_group):
    ws = open_workspace(_recipe(tiny_model_dir, tmp_path / "a", "ddp"))
    _, ddp, _ = train_workspace(ws)

    fs = open_workspace(_recipe(tiny_model_dir, tmp_path / "b", "fsdp"))

    class Crash(Exception):
        pass

    def crash_at_3(step, loss):
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train_workspace(fs, on_step=crash_at_3)
    path = latest_checkpoint(fs.run_dir)
    assert path.name == "step-000002" and (path / "shards" / ".metadata").is_file()
    state = json.loads((path / "state.json").read_text())
    assert state["checkpoint_format"] == "dcp" and state["world_size"] == 1
    fsdp_losses = [json.loads(x)["loss"] for x in (fs.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert fsdp_losses == pytest.approx(ddp.losses[:3], rel=1e-6)
    # what `tunelab eval` / `export` of the run read: the trainable tensors, whole, in one process
    with pytest.raises(CheckpointError, match="read it with tunelab.train.restore.read_checkpoint"):
        load_checkpoint(path)  # the plain reader knows no sharded format: the restore dispatcher does
    whole = read_checkpoint(path)
    assert whole["optimizer"] is None and whole["trainable"].keys() == load_checkpoint(
        latest_checkpoint(ws.run_dir))["trainable"].keys()
    # a sharded checkpoint resumes under ddp too (DCP fills whole tensors): it continues the run
    dist.destroy_process_group()
    again = open_workspace(_recipe(tiny_model_dir, tmp_path / "b", "ddp"), run_dir=fs.run_dir, resume=True)
    _, resumed, _ = train_workspace(again, resume=True)
    assert resumed.losses == pytest.approx(ddp.losses[2:], rel=1e-6)


def test_fsdp_on_cpu_returns_freed_large_blocks_to_the_kernel(process_group):
    """FSDP2's prepare maps blocks of 1 MiB or more (allocator.map_large_blocks) over the engine's keep-freed
    setting, which would keep them in the heap: freed activation-sized tensors leave the resident set at once."""
    from accelerate import Accelerator

    from tunelab.train.allocator import keep_freed_memory
    from tunelab.train.backends import build_backend

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    if not keep_freed_memory():
        pytest.skip("not glibc")
    backend = build_backend(Recipe.model_validate({"distributed": {"backend": "fsdp"}}), Accelerator(cpu=True))
    backend.prepare(build_tiny_model(256), lambda m: torch.optim.AdamW(m.parameters()))
    blocks = [torch.ones(2**20) for _ in range(32)]  # 32 x 4 MiB, written: resident
    before = rss_mb()
    del blocks
    assert rss_mb() < before - 100  # all 128 MiB back (kept in the heap, it would stay resident)


def test_a_sharded_checkpoint_without_its_shards_is_named_damaged(tiny_model_dir, tmp_path, process_group):
    fs = open_workspace(_recipe(tiny_model_dir, tmp_path, "fsdp", max_steps=2))
    train_workspace(fs)
    path = latest_checkpoint(fs.run_dir)
    (path / "shards" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"shards/\.metadata is damaged: missing"):
        read_checkpoint(path)


@pytest.mark.parametrize("method", ["galore", "mezo", "lisa", "qlora", "prompt_tuning", "adalora"])
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_a_method_that_does_not_shard_is_refused_at_validation(method, backend):
    with pytest.raises(RecipeError, match=rf"'method\.name': '{method}' does not run under "
                                          rf"distributed\.backend={backend}.*lora"):
        load_validated_recipe(None, [f"distributed.backend={backend}", f"method.name={method}"])
    load_validated_recipe(None, [f"method.name={method}"])  # under ddp it is fine


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "dora", "pissa", "vera", "ia3", "bitfit"])
def test_methods_that_shard_pass_validation(method):
    assert load_validated_recipe(None, ["distributed.backend=fsdp", f"method.name={method}"]).method.name == method


def test_two_ways_of_recomputing_activations_are_refused():
    from tunelab.train.backends import backend_class

    r = load_recipe(None, ["distributed.backend=fsdp", "distributed.fsdp.activation_checkpointing=true",
                           "train.gradient_checkpointing=true"])
    with pytest.raises(RecipeError, match="activation_checkpointing.*gradient_checkpointing"):
        backend_class(r)


def test_deepspeed_config_from_the_recipe_and_its_pass_through(tmp_path):
    from tunelab.train.deepspeed_backend import deepspeed_config

    r = load_recipe(None, ["distributed.backend=deepspeed", "distributed.deepspeed.zero_stage=3",
                           "distributed.deepspeed.offload_optimizer_device=cpu", "train.batch_size=4",
                           "train.grad_accum=2", "train.max_grad_norm=0.5"])
    cfg = deepspeed_config(r, world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # a JSON file merged over it: nested sections merge, "auto" for an owned key keeps tunelab's value
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 10},
                             "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": True}))
    cfg = deepspeed_config(r.model_copy(update={"distributed": r.distributed.model_copy(update={
        "deepspeed": r.distributed.deepspeed.model_copy(update={"config": str(f)})})}), world_size=2)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["wall_clock_breakdown"] is True


@pytest.mark.parametrize("extra,match", [
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps=8 differs from the 1"),
    ({"optimizer": {"type": "Adam"}}, "no 'optimizer' section; train.optimizer sets it"),
    ({"scheduler": {"type": "WarmupLR"}}, "no 'scheduler' section"),
])
def test_deepspeed_pass_through_cannot_contradict_the_recipe(extra, match):
    from tunelab.train.deepspeed_backend import deepspeed_config

    r = Recipe.model_validate({"distributed": {"backend": "deepspeed", "deepspeed": {"config": extra}}})
    with pytest.raises(RecipeError, match=rf"'distributed\.deepspeed\.config': {match}"):
        deepspeed_config(r, world_size=1)


def test_parameter_offload_needs_zero_3():
    pytest.importorskip("deepspeed")
    from tunelab.train.backends import backend_class

    r = load_recipe(None, ["distributed.backend=deepspeed", "distributed.deepspeed.offload_param_device=cpu"])
    with pytest.raises(RecipeError, match="offload_param_device.*zero_stage 3 only"):
        backend_class(r)


def test_unwrap_model_sees_through_an_engine_that_forwards_attributes():
    from tunelab.core.unwrap import unwrap_model

    class Engine(torch.nn.Module):  # as DeepSpeed's: unknown attributes are the module's
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = {"train_batch_size": 4}  # its own config, not the model's

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.__dict__["_modules"]["module"], name)

    model = build_tiny_model(256)
    engine = Engine(model)
    assert hasattr(engine, "get_input_embeddings")  # forwarded
    assert unwrap_model(engine) is model


def test_docs_list_exactly_the_methods_that_declare_sharding():
    import re
    from pathlib import Path

    from tunelab.methods.registry import list_methods

    doc = (Path(__file__).parents[2] / "docs" / "distributed.md").read_text()
    listed = re.search(r"Shard \(FSDP2 and ZeRO-3\): (.*?)\.\n\n", doc, re.S).group(1)
    declared = sorted(n for n, c in list_methods().items() if c.capabilities.supports_sharding)
    assert [m.strip() for m in listed.replace("\n", " ").split(",")] == declared
    undeclared = sorted(set(list_methods()) - set(declared))
    for name in undeclared:  # each one that does not shard is named with its reason
        assert re.search(rf"\b{name}\b", doc.split("Do not shard")[1].split("Objectives:")[0]), name
