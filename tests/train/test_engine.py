"""The training engine changes speed and memory, never the results (within the tolerance stated here).

Reference: HF's own `model(input_ids, attention_mask, labels).loss` (mean over target tokens) on the same
model with sdpa attention. fp32: equal to 1e-5 (loss) / 1e-4 (gradients), i.e. summation-order noise.
bf16 autocast: within 2e-2 relative, the size of bf16 rounding of activations (what the naive path itself
moves between two bf16 runs that differ only in kernel choice).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from tiny import build_tiny_model, tiny_recipe_dict

from tunelab.data.batching import collate_packed, collate_sft
from tunelab.objectives.base import build_objective
from tunelab.recipe import Recipe, TrainConfig
from tunelab.train.attention import grouped_causal_attention
from tunelab.train.engine import (
    compiled_layers,
    configure_engine,
    decoder_layers,
    resolve_compile,
    use_compile_cache,
)
from tunelab.train.precision import restore_frozen_weights


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 12, 5, 9, 16, 11):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _naive(model, examples, precision="fp32"):
    """HF's plain path: mean CE over target tokens, returned as (loss, grads)."""
    model.zero_grad(set_to_none=True)
    b = collate_sft(examples, pad_id=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _engine(model, examples, packed=False, precision="fp32", **train):
    """tunelab's path: the engine configured on the model, the SFT objective (chunked CE), optional packing
    (`packed`: True = rows of 32 tokens, "padding_free" = one row of exactly the batch's tokens)."""
    model.zero_grad(set_to_none=True)
    configure_engine(model, TrainConfig(precision=precision, **train), torch.device("cpu"))
    pack_length = None if packed == "padding_free" else 32
    b = collate_packed(examples, pad_id=2, pack_length=pack_length) if packed else collate_sft(examples, pad_id=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = build_objective("sft", {"chunk_size": 16}).compute(model, b)
    (out.loss_sum / out.n_units).backward()
    return (out.loss_sum / out.n_units).detach(), _grads(model)


def _assert_close(got, ref, rtol, atol):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert got[1].keys() == ref[1].keys() and ref[1]
    for n in ref[1]:
        torch.testing.assert_close(got[1][n].float(), ref[1][n].float(), rtol=rtol * 10, atol=atol * 10, msg=n)


@pytest.mark.parametrize("packed", [False, True, "padding_free"])
def test_engine_equals_naive_hf_fp32(packed):
    ref_model = build_tiny_model(512)
    ref = _naive(ref_model, _examples())
    # tunelab's attention named: `auto` picks sdpa under fp32, and its fp32 equality is what this checks
    got = _engine(copy.deepcopy(build_tiny_model(512)), _examples(), packed=packed, attention="tunelab")
    _assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_engine_lora_bf16_close_to_naive_hf():
    from tunelab.methods.registry import build_method

    def lora():
        model = build_method("lora", {"r": 4, "alpha": 8}).prepare(build_tiny_model(512))
        torch.manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # nonzero B, so that A's gradients are nonzero too
                p.data.normal_(0, 0.05)
        return model

    ref = _naive(lora(), _examples(), precision="bf16")
    for cast in ("linears", "all"):
        got = _engine(lora(), _examples(), precision="bf16", frozen_cast=cast)
        torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=0)
        for n, g in ref[1].items():
            rel = (got[1][n].float() - g).norm() / g.norm()
            assert rel < 2e-2, (cast, n, float(rel))


def test_attention_matches_sdpa_gqa_padding_and_packing():
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 6, 2, 10, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    padding = causal[None, None].repeat(b, 1, 1, 1)
    padding[1, :, :, 7:] = False  # the second row's last 3 positions are padding keys
    docs = torch.tensor([0] * 4 + [1] * 6)
    packed = (causal & (docs[:, None] == docs[None, :]))[None, None].repeat(b, 1, 1, 1)
    for mask in (None, padding, packed):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        ref = ref.transpose(1, 2)
        go = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (qs, ks, vs), go)
        qo, ko, vo = (x.clone().requires_grad_() for x in (q, k, v))
        out = grouped_causal_attention(qo, ko, vo, mask, d ** -0.5)
        grads = torch.autograd.grad(out, (qo, ko, vo), go)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_document_attention_equals_the_block_diagonal_mask(dtype):
    """Packed rows attended document by document give what the whole row under the block-diagonal mask gives."""
    from tunelab.data.batching import document_layout
    from tunelab.train.attention import document_attention

    torch.manual_seed(0)
    r, h, hkv, w, d = 2, 6, 2, 12, 8
    documents = [[5, 4, 3], [12]]  # row 0: three documents (the last one its padding tail), row 1: one
    index, slot = document_layout(documents, w)
    assert index.shape == (4, 12) and slot.tolist()[:6] == [0, 1, 2, 3, 4, 12]
    q, k, v = torch.randn(r, h, w, d), torch.randn(r, hkv, w, d), torch.randn(r, hkv, w, d)
    ids = torch.tensor([0] * 5 + [1] * 4 + [2] * 3), torch.zeros(w, dtype=torch.long)
    causal = torch.ones(w, w, dtype=torch.bool).tril()
    mask = torch.stack([causal & (doc[:, None] == doc[None, :]) for doc in ids])[:, None]  # [R, 1, W, W]
    go = torch.randn(r, w, h, d)
    outs, grads = [], []
    for attend in (lambda a, b, c: grouped_causal_attention(a, b, c, mask, d ** -0.5),
                   lambda a, b, c: document_attention(a, b, c, index, slot, d ** -0.5)):
        qkv = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = attend(*qkv)
        outs.append(out.float())
        grads.append([g.float() for g in torch.autograd.grad(out, qkv, go.to(dtype))])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for g, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, ref, **tol)


def test_packed_batches_take_the_document_path(monkeypatch):
    """With tunelab's attention a packed batch is attended per document: S rows of L tokens, not R rows of W."""
    from tunelab.train import attention

    seen = []
    real = attention.document_attention
    monkeypatch.setattr(attention, "document_attention", lambda *a: seen.append(a[3].shape) or real(*a))
    model = build_tiny_model(512)
    configure_engine(model, TrainConfig(precision="fp32", attention="tunelab"), torch.device("cpu"))
    batch = collate_packed(_examples(), pad_id=2, pack_length=None)
    assert batch["input_ids"].shape == (1, 60)
    build_objective("sft", {}).compute(model, batch)
    assert seen and set(seen) == {(6, 16)}  # the six examples, the longest 16 tokens


def test_attention_bf16_error_is_that_of_sdpa_bf16():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    bf = [x.bfloat16() for x in (q, k, v)]
    ours = grouped_causal_attention(*bf, None, 16 ** -0.5).float()
    sdpa = F.scaled_dot_product_attention(*bf, is_causal=True, enable_gqa=True).transpose(1, 2).float()
    err_ours, err_sdpa = (ours - ref).abs().max(), (sdpa - ref).abs().max()
    assert err_ours < 2 * err_sdpa + 1e-3


def test_attention_is_selected_and_falls_back(tiny_model):
    from tunelab.train.engine import set_attention

    assert set_attention(tiny_model, "auto", torch.device("cpu")) == "tunelab"
    assert tiny_model.config._attn_implementation == "tunelab"
    assert set_attention(tiny_model, "auto", torch.device("cuda")) == "sdpa"
    # under fp32 its bf16-probability saving does not apply: sdpa (CPU flash kernel), computing in fp32
    assert set_attention(tiny_model, "auto", torch.device("cpu"), "fp32") == "sdpa"
    assert tiny_model.config._attn_implementation == "sdpa"


def test_frozen_cast_all_and_restore_is_bit_exact():
    from tunelab.methods.registry import build_method

    base = build_tiny_model(512)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = build_method("lora", {"r": 2, "alpha": 4}).prepare(base)
    applied = configure_engine(model, TrainConfig(frozen_cast="all", precision="bf16"), torch.device("cpu"))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert applied["frozen_params_cast"] == sum(p.numel() for p in frozen)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert restore_frozen_weights(model, original) == len(frozen)
    for name, p in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in original:
            assert torch.equal(p.data, original[key]), name


def test_compiled_layers_train_like_eager_and_are_undone():
    model = build_tiny_model(512)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    ref = _naive(copy.deepcopy(model), _examples())
    with compiled_layers(model, True) as n:
        assert n == len(layers) and all(layer._compiled_call_impl is not None for layer in layers)
        got = _naive(model, _examples())
    assert all(layer._compiled_call_impl is None for layer in layers)
    _assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compiled_layers_recompute_in_the_compiler_instead_of_checkpointing():
    """Under compile, `gradient_checkpointing` becomes AOTAutograd's activation memory budget 0 (transformers'
    wrapper around a compiled layer would break its graph): same loss and gradients, the flag put back after."""
    import torch._functorch.config

    model = build_tiny_model(512)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    ref = _naive(copy.deepcopy(model), _examples())
    with compiled_layers(model, True):
        assert not any(layer.gradient_checkpointing for layer in layers)
        assert torch._functorch.config.activation_memory_budget == 0.0
        got = _naive(model, _examples())
    assert all(layer.gradient_checkpointing for layer in layers)
    assert torch._functorch.config.activation_memory_budget == 1.0
    _assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compiled_layers_keep_the_recipes_activation_budget():
    """`train.activation_memory_budget` is AOTAutograd's budget while the layers are compiled (put back on exit),
    and training with most activations recomputed equals eager."""
    import torch._functorch.config

    model = build_tiny_model(512)
    ref = _naive(copy.deepcopy(model), _examples())
    with compiled_layers(model, True, TrainConfig(activation_memory_budget=0.1)):
        assert torch._functorch.config.activation_memory_budget == 0.1
        got = _naive(model, _examples())
    assert torch._functorch.config.activation_memory_budget == 1.0
    _assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    model = build_tiny_model(512)

    def broken(self, *a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    with compiled_layers(model, True) as n:
        assert n == 0
    assert "training without it" in caplog.text


def test_compile_auto_resolves_to_cpu_unsharded_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) is True
    assert resolve_compile("auto", cpu, sharded=True) is False  # FSDP / DeepSpeed wrap the layers themselves
    assert resolve_compile("auto", cpu, batch_kind="preference") is False  # not measured: varying pair shapes
    assert resolve_compile("auto", cpu, batch_kind="rollout") is False
    assert resolve_compile(True, cpu, batch_kind="rollout") is True
    assert resolve_compile("auto", gpu) is False
    assert resolve_compile("auto", cpu, method_eager=True) is False  # BOFT: compiling costs more than it returns
    assert resolve_compile(True, cpu, method_eager=True) is True
    assert resolve_compile(True, gpu) is True and resolve_compile(False, cpu) is False
    assert TrainConfig().compile == "auto"


def test_compile_cache_in_tunelab_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    for before in (None, default_cache_dir()):  # unset, or torch's default written by an earlier import
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        assert use_compile_cache() == str(tmp_path / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == str(tmp_path / "mine")


def test_compiler_failing_at_first_call_trains_eagerly(monkeypatch, tmp_path):
    """nn.Module.compile only marks a layer; a compiler that fails when the layer first runs (no C++ compiler,
    an unsupported operator) must leave the step running eagerly, with the same results, not raise."""
    import torch._dynamo
    import torch._inductor.compile_fx

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cached graph would skip the broken compiler
    torch._dynamo.reset()
    model = build_tiny_model(512)
    ref = _naive(copy.deepcopy(model), _examples())
    with compiled_layers(model, True) as n:
        assert n == len(decoder_layers(model))
        got = _naive(model, _examples())
    torch._dynamo.reset()
    _assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch._dynamo.config.suppress_errors  # only while the layers are compiled


def test_run_with_every_engine_switch(tiny_model_dir, tmp_path):
    d = tiny_recipe_dict(tiny_model_dir, tmp_path, train={"max_steps": 2, "frozen_cast": "all", "precision": "bf16",
                                                          "attention": "tunelab"}, method={"name": "lora", "r": 2})
    from tunelab.runner import open_workspace, train_workspace

    ws = open_workspace(Recipe.model_validate(d))
    _, result, _ = train_workspace(ws)
    assert ws.engine["attention"] == "tunelab" and ws.engine["frozen_params_cast"] > 0
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
