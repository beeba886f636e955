"""The PEFT-backed methods on the tiny Llama: what trains (names and counts), that training lowers the loss
and touches nothing else, that the exported adapter reloads with identical logits on a fresh base, and that
merging is exact (or refused, for the virtual-token methods).

Each method is prepared and trained ONCE (module-scoped fixture); the tests below inspect that run.
Tiny Llama: hidden 64, intermediate 128, 4 heads / 2 KV heads (kv_dim 32), 2 layers, tied embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from tunelab.methods.registry import ExportUnsupported, build_method, count_parameters

H, INTER, KV, LAYERS = 64, 128, 32, 2
# (in, out) of q, k, v, o, gate, up, down
LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, INTER), (H, INTER), (INTER, H)]
SUM_IN_OUT = sum(i + o for i, o in LINEARS)  # 1024 per layer
SUM_OUT = sum(o for _, o in LINEARS)  # 512 per layer
SUM_IN = sum(i for i, _ in LINEARS)  # 512 per layer
STEPS = 10


def lora_count(r: int) -> int:
    return LAYERS * r * SUM_IN_OUT  # A [r, in] + B [out, r] per linear



@dataclass
class Case:
    options: dict
    count: int  # trainable parameters, computed by hand from the shapes above
    names: str  # regex every trainable parameter name matches
    lr: float
    min_drop: float = 0.4  # nats the loss must fall in STEPS steps (an untrained model's stays put)
    merge_atol: float | None = 1e-5  # None: the method cannot merge


CASES = {
    "dora": Case({"r": 4, "alpha": 8}, lora_count(4) + LAYERS * SUM_OUT, r"\.lora_(A|B|magnitude_vector)\.", 1e-2),
    "lora_gaussian": Case({"r": 4, "alpha": 8}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    "pissa": Case({"r": 4, "alpha": 4}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    "olora": Case({"r": 4, "alpha": 4}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    "corda": Case({"r": 4, "alpha": 4, "calibration_batches": 2}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    # rho=1: no rank redistribution, so every layer keeps r and the count is LoRA's
    "eva": Case({"r": 4, "alpha": 8, "rho": 1.0, "calibration_batches": 2}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    "lora_ga": Case({"r": 4, "alpha": 8, "calibration_batches": 2}, lora_count(4), r"\.lora_[AB]\.", 1e-2),
    "loraplus": Case({"r": 4, "alpha": 8, "lr_ratio": 16}, lora_count(4), r"\.lora_[AB]\.", 1e-3),
    # P [out, r] + E [r, 1] + Q [r, in] per linear
    "adalora": Case({"init_r": 4, "target_r": 2, "delta_t": 1, "tinit_ratio": 0.0, "tfinal_ratio": 0.0,
                     "total_step": STEPS}, LAYERS * (4 * SUM_IN_OUT + 4 * 7), r"\.lora_[ABE]\.", 3e-2),
    # lambda_b [out] + lambda_d [r] per linear; the random A, B are shared frozen buffers
    "vera": Case({"r": 16}, LAYERS * (SUM_OUT + 7 * 16), r"\.vera_lambda_[bd]\.", 1e-1),
    # (B1 A1) * (B2 A2): 2 r (in + out) per linear
    "loha": Case({"r": 2, "alpha": 2}, LAYERS * 2 * 2 * SUM_IN_OUT, r"\.hada_w[12]_[ab]\.", 3e-2),
    # out = a*b, in = c*d near square; W1 [a, c] + W2 [b, d] (r=8 is not < max(b, d)/2 here, so W2 is full):
    # q, o 64x64: 8*8 + 8*8; k, v 32x64: 4*8 + 8*8; gate, up 128x64: 8*8 + 16*8; down 64x128: 8*8 + 8*16
    "lokr": Case({}, LAYERS * (2 * 128 + 2 * 96 + 3 * 192), r"\.lokr_w[12]\.", 3e-2),
    # in / b blocks per linear, b (b - 1) / 2 skew-symmetric parameters each (b=16: 120)
    "oft": Case({"block_size": 16}, LAYERS * (SUM_IN // 16) * 120, r"\.oft_R\.", 3e-2),
    # m=1 factor: R [1, in / 4, 4, 4] + output scale s [out, 1]
    "boft": Case({}, LAYERS * (SUM_IN // 4 * 16 + SUM_OUT), r"\.boft_[Rs]\.", 1e-1),
    # l_k [kv], l_v [kv], l_ff [inter] per layer
    "ia3": Case({}, LAYERS * (KV + KV + INTER), r"\.ia3_l\.", 3e-1, min_drop=0.25),
    # input + post-attention norm per layer, plus the final norm
    "ln_tuning": Case({}, (2 * LAYERS + 1) * H, r"\.ln_tuning_layers\.", 1e-1, merge_atol=1e-6),
    "prompt_tuning": Case({"num_virtual_tokens": 4}, 4 * H, r"^prompt_encoder\.default\.embedding\.weight$", 3e-2,
                          min_drop=0.15, merge_atol=None),
    # P [n, layers * 2 * kv_dim]: keys and values of every layer, at the KV heads' width
    "prefix_tuning": Case({"num_virtual_tokens": 4}, 4 * LAYERS * 2 * KV, r"^prompt_encoder\.default\.embedding\.",
                          1e-1, min_drop=0.25, merge_atol=None),
    # P [n, h] + MLP h -> e -> e -> h (e=16), with biases
    "p_tuning": Case({"num_virtual_tokens": 4, "encoder_hidden_size": 16},
                     4 * H + (H * 16 + 16) + (16 * 16 + 16) + (16 * H + H), r"^prompt_encoder\.default\.", 3e-2,
                     min_drop=0.15, merge_atol=None),
}
CONVERTED = {"pissa", "olora", "corda", "lora_ga"}  # base weights change: the export is converted to plain LoRA


def fixed_batch(seed: int = 0, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def pattern_batch() -> dict[str, torch.Tensor]:
    """A learnable fixed batch: two 6-token cycles, repeated."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 250] * 2, [250, 7, 99, 42, 17, 5] * 2])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sft_loss(model, batch) -> torch.Tensor:
    from tunelab.objectives.sft import shifted_token_losses

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses, mask = shifted_token_losses(out.logits, batch["labels"])
    return losses.sum() / mask.sum()


def train_steps(method, model, batch, steps: int, lr: float) -> list[float]:
    """The loop's order per step: backward, after_backward, optimizer step, zero_grad, on_step_end."""
    from tunelab.recipe import TrainConfig
    from tunelab.train.optim import build_optimizer

    tc = TrainConfig(lr=lr, max_grad_norm=None)
    opt = method.build_optimizer(model, tc) or build_optimizer(method.param_groups(model, tc.weight_decay), tc)
    losses = []
    for step in range(1, steps + 1):
        loss = sft_loss(model, batch)
        loss.backward()
        if hasattr(method, "after_backward"):
            method.after_backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(model, step, opt)
        losses.append(float(loss.detach()))
    return losses


def load_tiny(model_dir):
    from tunelab.model import load_model
    from tunelab.recipe import ModelConfig

    return load_model(ModelConfig(name_or_path=str(model_dir)))


def prepared(name: str, model_dir, options: dict | None = None):
    """(method, wrapped model, the untouched base for comparison) with calibration where needed."""
    torch.manual_seed(0)
    method = build_method(name, CASES[name].options if options is None else options)
    base, reference = load_tiny(model_dir), load_tiny(model_dir)
    if method.capabilities.needs_calibration:
        method.calibrate(base, [fixed_batch(seed=100 + i, rows=4) for i in range(method.n_calibration_batches)])
    return method, method.prepare(base), reference


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tiny_model_dir):
    """Prepare the method, record grads of one backward, then train STEPS steps on a fixed batch."""
    name = request.param
    method, model, reference = prepared(name, tiny_model_dir)
    batch = pattern_batch()
    model.train()
    with torch.no_grad():
        start_logits = sft_logits(model, batch)
        ref_logits = reference(input_ids=batch["input_ids"]).logits
    sft_loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(method, model, batch, STEPS, CASES[name].lr)
    return dict(name=name, method=method, model=model, batch=batch, before=before, losses=losses,
                with_grad=with_grad, start_logits=start_logits, ref_logits=ref_logits)


def sft_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_names_and_count(run):
    case = CASES[run["name"]]
    names = trainable_names(run["model"])
    assert names and all(re.search(case.names, n) for n in names), sorted(names)[:5]
    assert count_parameters(run["model"])[0] == case.count


def test_only_trainable_parameters_get_gradients_and_change(run):
    model, before = run["model"], run["before"]
    names = trainable_names(model)
    assert run["with_grad"] == names
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = set(names)
    if run["name"] == "adalora":  # a matrix whose every triplet was pruned keeps E == 0 (its init)
        pattern = model.peft_config["default"].rank_pattern
        pruned = {f"base_model.model.{k}" for k, keep in pattern.items() if not any(keep)}
        assert all(torch.equal(dict(model.named_parameters())[n], torch.zeros(4, 1)) for n in pruned)
        expected -= pruned
    assert changed == expected  # every trainable tensor moved, and nothing else did (frozen: bit-exact)


def test_loss_falls(run):
    first, last = run["losses"][0], run["losses"][-1]
    assert last < first - CASES[run["name"]].min_drop, run["losses"]


def test_starts_as_the_base_model(run):
    """Every init keeps the function at step 0 (PiSSA & co. by subtracting B0 A0 from W), except soft prompts."""
    if run["name"] in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        assert not torch.allclose(run["start_logits"], run["ref_logits"], atol=1e-3)
    else:
        torch.testing.assert_close(run["start_logits"], run["ref_logits"], atol=2e-5, rtol=0)


def test_adapter_round_trip_on_a_fresh_base(run, tiny_model_dir, tiny_tokenizer, tmp_path):
    """export_adapter -> PeftModel.from_pretrained on a freshly loaded ORIGINAL base -> the trained logits."""
    from peft import PeftModel

    from tunelab.export import export_adapter

    model, batch, name = run["model"], run["batch"], run["name"]
    model.eval()
    with torch.no_grad():
        trained = sft_logits(model, batch)
    export_adapter(run["method"], model, tiny_tokenizer, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_tiny(tiny_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = sft_logits(loaded, batch)
    if got.shape[1] > trained.shape[1]:  # PEFT's own prompt-tuning logits include the virtual positions
        got = got[:, got.shape[1] - trained.shape[1]:]
    if name in CONVERTED:  # (W - s B0 A0) + s B A vs W + s [B | -B0] [A ; A0]: same function, other rounding
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)
    elif name == "adalora":  # pruned triplets are cut from the saved tensors: sums over fewer (zero) terms
        torch.testing.assert_close(got, trained, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, trained)
    with torch.no_grad():  # and the export left the live model as it was
        assert torch.equal(sft_logits(model, batch), trained)
    model.train()


def test_merge_or_refuse(run, tiny_tokenizer, tmp_path):
    """export_merged -> AutoModelForCausalLM: the merged logits equal the adapter model's; soft prompts refuse."""
    from transformers import AutoModelForCausalLM

    from tunelab.export import export_merged

    model, batch, method = run["model"], run["batch"], run["method"]
    tolerance = CASES[run["name"]].merge_atol
    if tolerance is None:
        with pytest.raises(ExportUnsupported, match="virtual tokens"):
            export_merged(method, model, tiny_tokenizer, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        return
    model.eval()
    with torch.no_grad():
        unmerged = sft_logits(model, batch)
    export_merged(method, model, tiny_tokenizer, tmp_path / "merged")  # merges in place: the last test of a run
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(sft_logits(merged, batch), unmerged, atol=tolerance, rtol=0)


PAPERS = {"dora": "2402.09353", "lora_gaussian": "2106.09685", "pissa": "2404.02948", "olora": "2406.01775",
          "corda": "2406.05223", "eva": "2410.07170", "lora_ga": "2407.05000", "loraplus": "2402.12354",
          "adalora": "2303.10512", "vera": "2310.11454", "loha": "2108.06098", "lokr": "2309.14859",
          "oft": "2306.07280", "boft": "2311.06243", "ia3": "2205.05638", "ln_tuning": "2312.11420",
          "prompt_tuning": "2104.08691", "prefix_tuning": "2101.00190", "p_tuning": "2103.10385"}


def test_registered_with_papers_docstrings_and_strict_configs():
    import sys

    import pydantic

    from tunelab.methods.registry import list_methods

    assert set(PAPERS) == set(CASES)
    methods = list_methods()
    for name, arxiv in PAPERS.items():
        cls = methods[name]
        assert cls.paper == f"https://arxiv.org/abs/{arxiv}" and cls.capabilities.is_adapter
        doc = sys.modules[cls.__module__].__doc__
        assert "Update rule" in doc and arxiv in doc and "Defaults" in doc, name
        with pytest.raises(pydantic.ValidationError):
            build_method(name, {"not_an_option": 1})
