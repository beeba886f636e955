"""The batch-source seam: the static source is today's sampler + collator; a generating source runs in eval
mode, without autograd and outside compiled layers; a source's state makes resume exact."""

import json
import random
from functools import partial

import pytest
import torch
from tiny import tiny_recipe_dict

from tunelab.data.batching import COLLATORS, StepSampler, collate_packed
from tunelab.recipe import DataConfig, Recipe
from tunelab.runner import open_workspace, prepare_workspace
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.engine import compiled_layers, decoder_layers
from tunelab.train.loop import train
from tunelab.train.sources import BatchSource, StaticBatchSource, generation_mode


def _examples(n=13):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 500, (4 + i % 5,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


class _Backend:  # what StaticBatchSource.from_recipe reads of a backend
    def __init__(self, world, rank):
        self.device, self.num_processes, self.process_index = torch.device("cpu"), world, rank


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1)])
def test_static_source_reproduces_the_loops_former_batches(packing, world, rank):
    data = _examples()
    recipe = Recipe(train={"batch_size": 2, "grad_accum": 3, "seed": 7, "epochs": 2.5},
                    data=DataConfig(packing=packing, pack_length=32))
    source = StaticBatchSource.from_recipe(recipe, data, batch_kind="sft", pad_id=2, backend=_Backend(world, rank))
    assert isinstance(source, BatchSource) and not source.generates
    # what train() did before the seam: its own StepSampler, make_collator, the whole run's length
    sampler = StepSampler(len(data), 2, 3, world, rank, 7)
    collate = partial(collate_packed, pack_length=32) if packing else COLLATORS["sft"]
    assert source.steps == sampler.steps_for_epochs(2.5) == int(13 * 2.5) // (6 * world)
    for step in reversed(range(source.steps)):  # any order: a batch is a function of its step alone
        got = source.micro_batches(step, None)
        want = [collate([data[i] for i in idx], 2) for idx in sampler.micro_batches(step)]
        assert len(got) == len(want) == 3
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    source.micro_batches(3, None)
    assert source.state_dict() == {"kind": "static", "position": 4, "examples_seen": 4 * 6 * world,
                                   "n_examples": 13, "global_batch": 6 * world, "seed": 7}


def test_static_source_length_is_max_steps_when_set():
    recipe = Recipe(train={"batch_size": 2, "max_steps": 50})
    source = StaticBatchSource.from_recipe(recipe, _examples(), batch_kind="preference", pad_id=2,
                                           backend=_Backend(1, 0))
    assert source.steps == 50 and source.collate is COLLATORS["preference"]


def test_static_source_warns_when_resumed_on_other_data(caplog):
    recipe = Recipe(train={"batch_size": 2})
    source = StaticBatchSource.from_recipe(recipe, _examples(), batch_kind="sft", pad_id=2, backend=_Backend(1, 0))
    source.load_state_dict({"position": 3, "n_examples": 99, "global_batch": 2, "seed": 0})
    assert source.position == 3 and "n_examples 13 (the checkpoint had 99)" in caplog.text


def test_generation_mode_is_eval_no_grad_and_eager_then_restores(tiny_model, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)  # nn.Module.compile without a compiler
    layers = decoder_layers(tiny_model)
    tiny_model.train()
    with compiled_layers(tiny_model, True):
        impls = [layer._compiled_call_impl for layer in layers]
        assert all(i is not None for i in impls)
        with generation_mode(tiny_model):
            assert not tiny_model.training and not torch.is_grad_enabled()
            assert all(layer._compiled_call_impl is None for layer in layers)
            out = tiny_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert tiny_model.training and torch.is_grad_enabled()
        assert [layer._compiled_call_impl for layer in layers] == impls
    assert out.shape == (1, 6)


class Rollouts:
    """A fake generating source: each step it greedily extends a few prompts with the policy and trains on the
    sequences (a rollout source in miniature). Records the conditions it generated under."""

    generates = True

    def __init__(self, n_steps, micro=2):
        self.steps, self.micro, self.seen = n_steps, micro, []

    def micro_batches(self, step, model):
        layers = decoder_layers(model)
        self.seen.append((model.training, torch.is_grad_enabled(), any(x._compiled_call_impl for x in layers)))
        prompts = torch.tensor([[5 + step, 6, 7], [9, 10 + step, 11]])
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False,
                              pad_token_id=2)
        return [{"input_ids": seqs[i: i + 1], "attention_mask": torch.ones_like(seqs[i: i + 1]),
                 "labels": seqs[i: i + 1].clone()} for i in range(self.micro)]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _workspace(tiny_model_dir, tmp_path, **train):
    d = tiny_recipe_dict(tiny_model_dir, tmp_path / "runs", train={"max_steps": 3, "save_every": None, **train},
                         method={"name": "full"}, eval={"before": False, "after": False})
    ws = open_workspace(Recipe.model_validate(d))
    return ws, prepare_workspace(ws)


def _train(ws, model, source, **kw):
    return train(ws.recipe, model, ws.method, ws.objective, source, run_dir=ws.run_dir, backend=ws.backend,
                 pad_id=ws.tokenizer.pad_token_id, progress=False, **kw)


def test_a_generating_source_runs_in_eval_mode_without_grad_outside_compiled_layers(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)  # train.compile's layers, no real compiler
    ws, model = _workspace(tiny_model_dir, tmp_path, compile=True)
    trained_under = []  # what the training forwards saw, through a hook on the first decoder layer
    layer = decoder_layers(model)[0]
    source = Rollouts(3)
    layer.register_forward_pre_hook(lambda m, a: trained_under.append(
        (model.training, torch.is_grad_enabled(), m._compiled_call_impl is not None)) if len(source.seen) and
        torch.is_grad_enabled() else None)
    result = _train(ws, model, source)
    assert source.seen == [(False, False, False)] * 3
    assert trained_under and set(trained_under) == {(True, True, True)}  # the same checks do fail in training
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


class Shuffler:
    """A stateful fake source: which examples each step trains on depends on every draw before it (like a
    rollout buffer), so only a restored state lets a resumed run see the uninterrupted run's batches."""

    generates = False

    def __init__(self, data, collate, pad_id, steps):
        self.data, self.collate, self.pad_id, self.steps = data, collate, pad_id, steps
        self.rng = random.Random(123)

    def micro_batches(self, step, model):
        picks = [self.rng.randrange(len(self.data)) for _ in range(4)]
        return [self.collate([self.data[i] for i in picks[:2]], self.pad_id),
                self.collate([self.data[i] for i in picks[2:]], self.pad_id)]

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def test_resume_is_exact_with_the_source_state(tiny_model_dir, tmp_path):
    def run(sub, on_step=None, resume=False, run_dir=None):
        d = tiny_recipe_dict(tiny_model_dir, tmp_path / sub, train={"max_steps": 6, "save_every": 2, "lr": 5e-3},
                             eval={"before": False, "after": False})
        ws = open_workspace(Recipe.model_validate(d), run_dir=run_dir, resume=resume)
        model = prepare_workspace(ws)
        source = Shuffler(ws.train_data, COLLATORS["sft"], ws.tokenizer.pad_token_id, 6)
        return ws, _train(ws, model, source, on_step=on_step, resume=resume)

    _, full = run("a")

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        run("b", on_step=crash_at_5)
    run_dir = tmp_path / "b" / "tiny"
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == 4 and "rng" in state["source"]
    run("b", resume=True, run_dir=run_dir)
    curve = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert curve == full.losses


def test_the_static_source_state_is_in_the_checkpoint(tiny_model_dir, tmp_path):
    ws, model = _workspace(tiny_model_dir, tmp_path, save_every=2)
    source = StaticBatchSource.from_recipe(ws.recipe, ws.train_data, batch_kind="sft", pad_id=2, backend=ws.backend)
    _train(ws, model, source)
    state = json.loads((latest_checkpoint(ws.run_dir) / "state.json").read_text())
    assert state["step"] == 3 and state["source"]["position"] == 3 and state["source"]["examples_seen"] == 12


class Finite:
    """No length of its own; runs dry after `n` steps."""

    generates, steps = False, None

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def micro_batches(self, step, model):
        return [self.batch] if step < self.n else []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_source_without_length_runs_until_max_steps_or_until_it_runs_dry(tiny_model_dir, tmp_path):
    ws, model = _workspace(tiny_model_dir, tmp_path, max_steps=5)
    batch = COLLATORS["sft"](ws.train_data[:2], ws.tokenizer.pad_token_id)
    assert _train(ws, model, Finite(batch, 99)).steps == 5
    ws2, model2 = _workspace(tiny_model_dir, tmp_path / "dry", max_steps=5)
    result = _train(ws2, model2, Finite(batch, 2))
    assert result.steps == 2 and len(result.losses) == 2
    assert latest_checkpoint(ws2.run_dir).name == "step-000002"  # the last completed step is saved
    ws3, model3 = _workspace(tiny_model_dir, tmp_path / "none", max_steps=5)
    ws3.recipe.train.max_steps = None
    with pytest.raises(ValueError, match="train.max_steps"):
        _train(ws3, model3, Finite(batch, 2))
