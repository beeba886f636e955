"""tunelab's own methods (bitfit, ssf, houlsby, loreft, asymmetric_lora, cola, diablo): the contract every one
of them keeps, checked on the tiny Llama. Per-method counts and hand-computed update rules are in
test_own_<method>.py, which import the helpers below."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import build_tiny_model

from tunelab.methods.registry import ExportUnsupported, build_method, list_methods

VOCAB = 256
# options small enough for the tiny model (hidden 64, intermediate 128, kv 32, 2 layers)
METHODS = {
    "bitfit": {},
    "ssf": {},
    "houlsby": {"bottleneck": 8},
    "loreft": {"r": 2},
    "asymmetric_lora": {"r": 4, "alpha": 8},
    "cola": {"r": 4, "alpha": 8, "restart_every": 2, "links": 3},
    "diablo": {"num_blocks": 8},
}
MERGEABLE = ["bitfit", "ssf", "asymmetric_lora", "cola", "diablo"]
OWN_FORMAT = ["bitfit", "ssf", "houlsby", "loreft", "diablo"]  # tunelab_adapter.*; the others export PEFT LoRA
TOL = 1e-5  # fp32 merged-vs-unmerged tolerance


def batch(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def base_model(**overrides):
    return build_tiny_model(VOCAB, seed=0, **overrides)


def prepared(name: str, opts: dict | None = None, examples: list[dict] | None = None, **model_overrides):
    """Build and prepare a method as the assembler does (calibrated first when its capabilities say so)."""
    method = build_method(name, METHODS[name] if opts is None else opts)
    model = base_model(**model_overrides)
    if method.capabilities.calibrates_from_examples:
        method.calibrate_from_examples(model, examples or [], None, pad_id=0, batch_size=1)
    return method, method.prepare(model)


def train(method, model, steps: int = 3, lr: float = 1e-2, ids: torch.Tensor | None = None) -> list[float]:
    """AdamW over the method's groups on a fixed batch, with the method's step hook; returns the losses."""
    ids = batch() if ids is None else ids
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(model, step, opt)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=batch() if ids is None else ids).logits


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of each of the seven projections of one decoder layer of the tiny Llama."""
    c = model.config
    h, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h),
            "up_proj": (inter, h), "down_proj": (h, inter)}


def test_registered_with_their_papers():
    methods = list_methods()
    papers = {"bitfit": "2106.10199", "ssf": "2210.08823", "houlsby": "1902.00751", "loreft": "2404.03592",
              "asymmetric_lora": "2402.16842", "cola": "2401.04151", "diablo": "2506.03230"}
    for name, arxiv in papers.items():
        assert methods[name].paper == f"https://arxiv.org/abs/{arxiv}"


@pytest.mark.parametrize("name", list(METHODS))
def test_starts_unchanged_and_loss_falls(name):
    ref = logits(base_model())
    method, model = prepared(name)
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-6)  # every method's init is the identity
    losses = train(method, model, steps=4)
    assert losses[-1] < losses[0] - 0.03, losses


@pytest.mark.parametrize("name", list(METHODS))
def test_only_trainable_parameters_change(name):
    opts = {**METHODS[name], "restart_every": 1000} if name == "cola" else None  # no merge into W here
    method, model = prepared(name, opts)
    before, names = params(model), trainable_names(model)
    train(method, model, steps=2)
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # every trainable tensor moved (B/up get a gradient at step 1, A/down at step 2), every frozen one is
    # bit-identical (base weights included)
    assert changed == names


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_round_trip_is_exact(name):
    opts = {**METHODS[name], "restart_every": 1} if name == "cola" else None
    method, model = prepared(name, opts)
    train(method, model, steps=3)  # cola: restarts at steps 1 and 2, so the chain replay is exercised
    state = {k: v.clone() for k, v in method.trainable_state_dict(model).items()}
    method2, model2 = prepared(name, opts)
    fresh = method2.trainable_state_dict(model2)
    assert any(not torch.equal(fresh[k], state[k]) for k in fresh)  # the round trip has something to carry
    method2.load_trainable_state_dict(model2, state)
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(logits(model), logits(model2))
    assert method2.state_dict() == method.state_dict()


def _perturb(method, model, seed=1):
    """Train a step, then also make every trainable tensor non-trivial (zero-init parts included)."""
    train(method, model, steps=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_equals_unmerged_and_reloads(name, tmp_path):
    from transformers import AutoModelForCausalLM

    method, model = prepared(name)
    _perturb(method, model)
    ref = logits(model)
    assert not torch.allclose(ref, logits(base_model()), atol=1e-3)  # the method did change the function
    merged = method.merged_model(model)
    mods = {type(m).__module__.split(".")[0] for m in merged.modules()}
    assert mods <= {"torch", "transformers"}, mods  # no wrapper or PEFT module left
    torch.testing.assert_close(logits(merged), ref, rtol=0, atol=TOL)
    merged.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["houlsby", "loreft"])
def test_not_mergeable_says_so_and_leaves_model_intact(name):
    method, model = prepared(name)
    _perturb(method, model)
    ref = logits(model)
    with pytest.raises(ExportUnsupported, match="PEFT cannot load it"):
        method.merged_model(model)
    assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("name", OWN_FORMAT)
def test_own_format_adapter_round_trip(name, tmp_path):
    from tunelab.methods._modules import ADAPTER_CONFIG, load_own_adapter

    method, model = prepared(name)
    _perturb(method, model)
    method.save_adapter(model, str(tmp_path))
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["method"] == name and meta["options"] == method.config.model_dump()
    assert "PEFT" in meta["note"] and not (tmp_path / "adapter_config.json").exists()
    _, reloaded = load_own_adapter(base_model(), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["asymmetric_lora", "cola"])
def test_peft_adapter_export_loads_with_peft(name, tmp_path):
    from peft import PeftModel

    method, model = prepared(name)
    _perturb(method, model)
    if name == "cola":
        method.restart(model)  # and one more link on top of the perturbed one, so the chain is non-trivial
        _perturb(method, model, seed=2)
    method.save_adapter(model, str(tmp_path))
    loaded = PeftModel.from_pretrained(base_model(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", [("loreft", {"r": 2, "positions": "f3"}), ("ssf", {})])
def test_run_recipe_trains_evaluates_and_exports(name, opts, tiny_model_dir, tmp_path):
    # the whole main path: eval (greedy generation through the method's modules), train, exports
    from tiny import tiny_recipe_dict

    from tunelab.recipe import Recipe
    from tunelab.runner import run_recipe

    recipe = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, method={"name": name, **opts},
                                                    train={"max_steps": 2}))
    summary = run_recipe(recipe)
    assert summary["steps"] == 2 and "exact_match" in summary["after"]
    exports = summary["exports"]
    assert (tmp_path.glob("*/export/adapter/tunelab_adapter.json").__next__()).is_file()
    if name == "loreft":
        assert exports["merged"].startswith("skipped: loreft: the intervention")
    else:
        assert (tmp_path.glob("*/export/merged/config.json").__next__()).is_file()
