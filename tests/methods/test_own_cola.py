"""COLA: a restart folds the link into W exactly and starts a zero link with fresh A and zeroed optimizer state;
the schedule; merged export carries every link; resume through the real loop is bit-exact."""

import json
import logging

import pytest
import torch
from test_own_common import base_model, linear_shapes, logits, n_trainable, prepared, train

from tunelab.methods.asymmetric_lora import lora_layers


def _snapshot_links(model):
    return {n: (layer.get_base_layer().weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
                layer.lora_B["default"].weight.detach().clone(), layer.scaling["default"])
            for n, layer in lora_layers(model)}


def test_restart_folds_the_link_exactly_and_starts_fresh():
    method, model = prepared("cola", {"r": 4, "alpha": 8, "restart_every": 2, "links": 3})
    layers = model.config.num_hidden_layers
    assert n_trainable(model) == layers * 4 * sum(o + i for o, i in linear_shapes(model).values())  # plain LoRA
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    method.on_step_end(model, 1, opt)  # not a restart step
    assert method.chain == []
    before, ref = _snapshot_links(model), logits(model)
    method.on_step_end(model, 2, opt)  # restart
    assert len(method.chain) == 1
    for n, layer in lora_layers(model):
        w0, a1, b1, s = before[n]
        assert s == 2.0  # alpha / r
        # the base now carries exactly the first link's delta, the new link is zero with a fresh A
        assert torch.equal(layer.get_base_layer().weight, w0 + (b1 @ a1) * s)
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(b1))
        assert not torch.equal(layer.lora_A["default"].weight, a1)
        assert layer.lora_A["default"].weight.abs().max() <= 1 / 8  # PEFT's Kaiming-uniform bound, in = 64
        assert torch.equal(method.chain[0][n][0], a1) and torch.equal(method.chain[0][n][1], b1)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            st = opt.state[p]
            assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-5)  # the function is unchanged by a restart
    # the fresh A is a pure function of (seed, link index): same on every process and on resume
    other, model2 = prepared("cola", {"r": 4, "alpha": 8, "restart_every": 2, "links": 3})
    other.restart(model2)
    assert all(torch.equal(la["default"].weight, lb["default"].weight) for la, lb in zip(
        [x.lora_A for _, x in lora_layers(model)], [x.lora_A for _, x in lora_layers(model2)]))


def test_schedule_and_cap(caplog):
    method, model = prepared("cola", {"r": 2, "alpha": 4, "restart_every": 2, "links": 3})
    for step in range(1, 11):
        method.on_step_end(model, step, None)
    assert len(method.chain) == 2  # links - 1 restarts (at steps 2 and 4), then no more
    m2, _ = prepared("cola", {"r": 2, "alpha": 4, "links": 3})
    m2.on_train_start(None, 10)
    assert m2.restart_interval() == 4  # ceil(10 / 3)
    m3, _ = prepared("cola", {"r": 2, "alpha": 4})
    with caplog.at_level(logging.WARNING):
        assert m3.restart_interval() == 100
    assert "restart_every not set" in caplog.text


def test_merged_model_carries_every_link():
    method, model = prepared("cola", {"r": 4, "alpha": 8, "restart_every": 2, "links": 3})
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(model)}
    train(method, model, steps=5, lr=2e-2)  # restarts at 2 and 4; link 3 trained for one step
    assert len(method.chain) == 2
    ref = logits(model)
    total = {n: w0[n] + sum((b @ a) * 2.0 for a, b in [link[n] for link in method.chain])
             + layer.get_delta_weight("default") for n, layer in lora_layers(model)}
    merged = method.merged_model(model)
    for n, w in total.items():
        name = n.removeprefix("base_model.model.")
        torch.testing.assert_close(merged.get_submodule(name).weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ref, logits(base_model()), atol=1e-3)


def test_rejects_modules_to_save():
    with pytest.raises(ValueError, match="modules_to_save"):
        prepared("cola", {"r": 2, "modules_to_save": ["lm_head"]})


@pytest.mark.slow
def test_resume_through_the_loop_is_bit_exact(tiny_model_dir, tmp_path):
    from tiny import tiny_recipe_dict

    from tunelab.recipe import Recipe
    from tunelab.runner import open_workspace, train_workspace
    from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint

    def recipe(sub):
        return Recipe.model_validate(tiny_recipe_dict(
            tiny_model_dir, tmp_path / sub, train={"max_steps": 6, "save_every": 2},
            method={"name": "cola", "r": 4, "alpha": 8, "restart_every": 2, "links": 4}))

    ws = open_workspace(recipe("a"))
    _, full, _ = train_workspace(ws)

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash()

    ws2 = open_workspace(recipe("b"))
    with pytest.raises(Crash):
        train_workspace(ws2, on_step=crash_at_5)
    ckpt = load_checkpoint(latest_checkpoint(ws2.run_dir))  # step 4: two links merged, the third just started
    assert ckpt["state"]["method"] == {"links_merged": 2}
    ws3 = open_workspace(recipe("b"), run_dir=ws2.run_dir, resume=True)
    _, resumed, _ = train_workspace(ws3, resume=True)
    curve = [json.loads(x)["loss"] for x in (ws2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert curve == full.losses
    final_a = load_checkpoint(latest_checkpoint(ws.run_dir))["trainable"]
    final_b = load_checkpoint(latest_checkpoint(ws2.run_dir))["trainable"]
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert sum(k.startswith("cola_chain.") for k in final_a) == 3 * 2 * 14  # 3 merged links x (A, B) x 14 linears
