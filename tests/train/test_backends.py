"""The distributed-backend seam: building one from a recipe, global-norm clipping (also when the engine reports
no norm), checkpoints through the backend, full state for export."""

import json

import pytest
import torch
from accelerate import Accelerator
from tiny import tiny_recipe_dict

from tunelab.recipe import Recipe, RecipeError, load_recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.backends import Backend, DDPBackend, build_backend


@pytest.fixture(scope="module")
def backend():
    return DDPBackend(Accelerator(cpu=True))


def test_ddp_is_the_default_backend(backend):
    b = build_backend(Recipe(), backend.accelerator)
    assert isinstance(b, DDPBackend) and isinstance(b, Backend)
    assert b.is_eval_process and b.is_generate_process and b.is_main_process and b.num_processes == 1


@pytest.mark.parametrize("name", ["fsdp", "deepspeed"])
def test_sharded_backends_are_built_from_the_recipe(name, backend):
    pytest.importorskip("deepspeed") if name == "deepspeed" else None
    b = build_backend(load_recipe(None, [f"distributed.backend={name}"]), backend.accelerator)
    assert b.name == name and b.sharded and isinstance(b, Backend)
    assert b.is_eval_process  # forward passes are collective under sharding: every process evaluates


def test_deepspeed_without_its_package_is_refused_naming_the_field(backend, tiny_model_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    recipe = load_recipe(None, ["distributed.backend=deepspeed"])
    with pytest.raises(RecipeError, match=r"'distributed\.backend': 'deepspeed' needs the DeepSpeed package: "
                                          r"pip install 'tunelab\[deepspeed\]'"):
        build_backend(recipe, backend.accelerator)
    # through the runner: refused before a run directory is made
    r = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", distributed={"backend": "deepspeed"}))
    with pytest.raises(RecipeError, match=r"distributed\.backend"):
        open_workspace(r)
    assert not (tmp_path / "runs").exists()


def test_an_unknown_backend_is_a_schema_error_naming_the_field():
    with pytest.raises(RecipeError, match=r"'distributed\.backend'"):
        load_recipe(None, ["distributed.backend=horovod"])


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def test_clip_returns_the_global_norm_before_clipping(backend):
    params, ref = _grads(), _grads()
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    got = backend.clip_grad_norm(params, 0.5)
    assert isinstance(got, float) and got == pytest.approx(float(want))
    assert all(torch.allclose(p.grad, r.grad) for p, r in zip(params, ref))


def test_clip_without_a_norm_from_the_engine_gives_none(monkeypatch):
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc, "clip_grad_norm_", lambda params, max_norm: None)  # DeepSpeed's answer
    assert DDPBackend(acc).clip_grad_norm(_grads(), 1.0) is None


def _run(tiny_model_dir, tmp_path, sub):
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / sub, train={"max_steps": 3, "max_grad_norm": 1.0},
                         eval={"before": False, "after": False})
    ws = open_workspace(Recipe.model_validate(d))
    return ws


def test_a_backend_that_reports_no_norm_trains_and_logs_the_norm_as_absent(tiny_model_dir, tmp_path, monkeypatch):
    ws = _run(tiny_model_dir, tmp_path, "with")
    train_workspace(ws)
    lines = [json.loads(x) for x in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(x["grad_norm"], float) for x in lines)  # the usual backend: a norm every step

    ws2 = _run(tiny_model_dir, tmp_path, "without")
    clipped = []

    def no_norm(self, params, max_norm):  # as DeepSpeed's engine: clips inside its step, reports no norm
        clipped.append(max_norm)

    monkeypatch.setattr(DDPBackend, "clip_grad_norm", no_norm)
    _, result2, _ = train_workspace(ws2)
    lines = [json.loads(x) for x in (ws2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert clipped == [1.0] * 3 and len(lines) == 3 and all("grad_norm" not in x for x in lines)
    assert result2.steps == 3 and all(torch.isfinite(torch.tensor(result2.losses)))


def test_full_state_for_export_is_the_whole_model(backend, tiny_model):
    state = backend.gather_full_state(tiny_model)
    ref = tiny_model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_prepare_builds_the_optimizer_on_the_prepared_model(backend, tiny_model):
    seen = []

    def make(m):
        seen.append(m)
        return torch.optim.SGD(m.parameters(), lr=0.1)

    model, opt = backend.prepare(tiny_model, make)
    assert seen == [tiny_model] and model is tiny_model  # one process: no DDP wrapper
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
