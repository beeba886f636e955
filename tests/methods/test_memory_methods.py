"""galore / mezo / qlora and the 8-bit optimizers: numerical checks against references (galore-torch
used directly, a hand-written GaLore step, SPSA vs the true directional derivative, NF4 error bound
and an independent NF4 quantiser), what changes, memory accounting, merge/export, resume, loss falls."""

import io
import json

import pytest
import torch
from test_sparse_common import assert_resume_exact, backend, changed, run, setup, snapshot, task, tiny, train_config

from tunelab.methods.registry import build_method
from tunelab.objectives.base import build_objective

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- GaLore ----------------------------------------------------------------------------------------

def test_galore_wiring_gives_the_same_updates_as_galore_adamw_used_directly():
    from galore_torch import GaLoreAdamW

    tc = train_config(lr=1e-2, weight_decay=0.01)
    opts = {"rank": 8, "update_proj_gap": 2, "scale": 0.25}
    method = build_method("galore", opts)
    ours, opt = setup(method, tiny(2), tc)
    ref = tiny(2)
    proj = [m.weight for n, m in ref.named_modules() if n.split(".")[-1] in TARGETS]
    ids = {id(p) for p in proj}
    rest = [p for p in ref.parameters() if id(p) not in ids]
    direct = GaLoreAdamW(
        [{"params": proj, "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std", "weight_decay": 0.01},
         {"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.01},
         {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, weight_decay=0.01, no_deprecation_warning=True)
    run(method, ours, opt, range(3), tc)  # crosses a projection refresh (gap 2)
    run(build_method("full", {}), ref, direct, range(3), tc)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    # Adam moments live in the rank-8 space: [64, 8] for square q_proj (right), [8, 64] for k_proj [32, 64] (left)
    q, k = ours.model.layers[0].self_attn.q_proj.weight, ours.model.layers[0].self_attn.k_proj.weight
    assert opt.state[q]["exp_avg"].shape == (64, 8) and opt.state[k]["exp_avg"].shape == (8, 64)


def test_galore_step_matches_a_hand_written_projection():
    """One step on W [16, 40] (wide: left projection) equals P (scale * Adam(P^T G)); the update has rank r."""
    from tunelab.methods.galore import galore_adamw_class

    torch.manual_seed(0)
    w0, g = torch.randn(16, 40), torch.randn(16, 40)
    p = torch.nn.Parameter(w0.clone())
    opt = galore_adamw_class()([{"params": [p], "rank": 3, "update_proj_gap": 10, "scale": 0.5, "proj_type": "std"}],
                               lr=0.1)
    p.grad = g.clone()
    opt.step()
    u, _, _ = torch.linalg.svd(g.double(), full_matrices=False)
    proj = u[:, :3]  # [16, 3] top left singular vectors of G
    r = proj.T @ g.double()  # [3, 40] projected gradient
    m, v = 0.1 * r, 0.001 * r * r  # Adam moments after one step
    step_size = 0.1 * (1 - 0.999) ** 0.5 / (1 - 0.9)
    expected = w0.double() - step_size * 0.5 * proj @ (m / (v.sqrt() + 1e-6))
    torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-5)
    sv = torch.linalg.svdvals((p.detach() - w0).double())  # rank 3 up to float32 rounding of W
    assert (sv[3:] < 1e-4 * sv[0]).all() and sv[2] > 1e-2 * sv[0]


def test_galore_checkpoint_loads_weights_only_and_resumes_exactly():
    # split=3 sits between projection refreshes (gap 2: steps 0, 2, 4), so the projector must be restored
    losses = assert_resume_exact("galore", {"rank": 8, "update_proj_gap": 2}, train_config(), steps=8, split=3)
    assert losses[-1] < 0.7 * losses[0]


# -- MeZO ------------------------------------------------------------------------------------------

def _quadratic(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a @ a.T + torch.eye(n, dtype=torch.float64)  # SPD
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w1 = torch.randn(5, generator=g, dtype=torch.float64)  # two parameter tensors: z is generated per tensor
    w2 = torch.randn(n - 5, generator=g, dtype=torch.float64)

    def loss():
        w = torch.cat([w1, w2])
        return float(0.5 * w @ a @ w + b @ w)

    grad = lambda: a @ torch.cat([w1, w2]) + b  # noqa: E731
    return [w1, w2], loss, grad


def test_spsa_estimate_is_the_exact_directional_derivative_on_a_quadratic():
    from tunelab.methods.mezo import regenerate_z, spsa_projected_grad

    params, loss, grad = _quadratic()
    w_before = [p.clone() for p in params]
    for seed in range(5):
        g, _, _ = spsa_projected_grad(loss, params, seed, eps=1e-2)  # central differences are exact for quadratics
        z = torch.cat(regenerate_z(params, seed))
        assert g == pytest.approx(float(grad() @ z), rel=1e-9)
        torch.testing.assert_close(g * z, (grad() @ z) * z, rtol=1e-9, atol=1e-12)
    for p, p0 in zip(params, w_before):
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-13)  # +eps, -2eps, +eps restores W


def test_spsa_estimate_is_unbiased_for_the_gradient():
    from tunelab.methods.mezo import regenerate_z, spsa_projected_grad

    params, loss, grad = _quadratic()
    n = 3000
    est = sum(spsa_projected_grad(loss, params, s, eps=1e-3)[0] * torch.cat(regenerate_z(params, s))
              for s in range(n)) / n  # E[(grad . z) z] = grad since E[z z^T] = I
    assert float((est - grad()).norm() / grad().norm()) < 0.1  # Monte Carlo error ~ sqrt((d+1)/n) = 0.055


def test_spsa_matches_the_directional_derivative_of_a_smooth_function():
    from tunelab.methods.mezo import regenerate_z, spsa_projected_grad

    w = torch.linspace(-1, 1, 7, dtype=torch.float64)
    f = lambda: float(torch.sin(w).sum() + (w ** 4).sum())  # noqa: E731
    g, _, _ = spsa_projected_grad(f, [w], seed=11, eps=1e-5)
    z = regenerate_z([w], 11)[0]
    assert g == pytest.approx(float((torch.cos(w) + 4 * w ** 3) @ z), rel=1e-8)


def test_mezo_step_is_w_minus_lr_g_z_with_no_backward_and_no_state():
    method = build_method("mezo", {"eps": 1e-3, "seed": 5})
    tc = train_config(lr=1e-3)
    model, opt = setup(method, tiny(2), tc)
    before = snapshot(model)
    batch = task()
    sft = build_objective("sft", {})
    with torch.no_grad():
        units = int((batch["labels"][:, 1:] != -100).sum())
        loss_at_w = float(sft.compute(model.eval(), batch).loss_sum) / units
    model.train()
    result = method.custom_step(model=model, batches=[batch], objective=sft, optimizer=opt, lr=1e-3, step=7, ref=None,
                                backend=backend())
    loss_sum, global_units = result.loss_sum, result.global_units
    assert global_units == units and loss_sum / units == pytest.approx(loss_at_w, abs=2e-3)  # (L+ + L-)/2 + O(eps^2)
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    from tunelab.methods.mezo import regenerate_z, step_seed

    params = [p for g in opt.param_groups for p in g["params"]]
    zs = regenerate_z(params, step_seed(5, 7))
    names = {id(p): n for n, p in model.named_parameters()}
    for p, z in zip(params, zs):
        n = names[id(p)]
        torch.testing.assert_close(p.detach(), before[n] - 1e-3 * method.last_projected_grad * z, rtol=0, atol=1e-6)


def test_mezo_full_loss_falls_and_resume_is_exact():
    tc = train_config(lr=3e-3)
    assert_resume_exact("mezo", {}, tc, steps=4, split=2)
    method = build_method("mezo", {})
    model, opt = setup(method, tiny(2), tc)
    losses = run(method, model, opt, range(60), tc)
    assert sum(losses[-5:]) / 5 < 0.97 * losses[0]  # zeroth order: slow, but down


def test_mezo_lora_perturbs_only_the_adapter(tmp_path):
    method = build_method("mezo", {"params": "lora", "r": 4, "alpha": 8})
    tc = train_config(lr=0.1)
    model, opt = setup(method, tiny(2), tc)
    assert method.capabilities.is_adapter
    before = snapshot(model)
    run(method, model, opt, range(3), tc)
    moved = changed(before, model)
    assert moved and all("lora_" in n for n in moved)  # base weights bit-identical after the +/- perturbations
    assert all(p.grad is None for p in model.parameters())
    method.save_adapter(model, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


# -- QLoRA -----------------------------------------------------------------------------------------

NF4_CODES = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                          0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def test_nf4_round_trip_error_is_bounded():
    from tunelab.methods.qlora import dequantize, quantize_nf4

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05  # 256 blocks of 64 -> one scaler block of 256
    deq = dequantize(quantize_nf4(w, 64, 256)).float()
    blocks, deq_b = w.view(-1, 64), deq.view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # [256, 1] exact block scales
    # independent reference: nearest NF4 code of w / absmax, times the EXACT scale
    codes = NF4_CODES[(blocks / absmax).unsqueeze(-1).sub(NF4_CODES).abs().argmin(-1)]
    ref = codes * absmax
    # double quantisation: scales - mean stored in int8 with factor 128 / max|scale - mean| (clamped at 127)
    scale_err = (absmax - absmax.mean()).abs().max() / 128
    assert (deq_b - ref).abs().max() <= scale_err * 1.0001  # |code| <= 1, so the error is the scale's
    half_gap = float((NF4_CODES[1:] - NF4_CODES[:-1]).max() / 2)  # 0.1519: between -1 and -0.6962
    assert ((deq_b - blocks).abs() <= half_gap * absmax + scale_err * 1.0001).all()
    assert float((deq - w).norm() / w.norm()) < 0.1  # ~9% for Gaussian weights


def test_qlora_base_is_nf4_trains_only_lora_and_reports_memory():
    from tunelab.methods.qlora import is_nf4, memory_report

    method = build_method("qlora", {"r": 4, "alpha": 8})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    linears = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(".base_layer") and n.split(".")[-2] in TARGETS]
    assert len(linears) == 14 and all(is_nf4(m.weight) for m in linears)
    report = memory_report(model)
    numel = sum(m.weight.numel() for m in linears)
    n_blocks = numel // 64
    # codes (2 per byte) + int8 block scales + per-matrix: bf16 factors (n_blocks / gcd(n_blocks, 256)), mean, codebook
    per_matrix = sum(2 * (m.weight.numel() // 64) // min(m.weight.numel() // 64, 256) + 2 + 16 * 2 for m in linears)
    assert report["nf4_bytes"] == numel // 2 + n_blocks + per_matrix
    assert report["bf16_bytes"] == 2 * numel and report["ratio_vs_bf16"] < 0.3
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_nf4(p)}  # NF4 clone re-quantises
    codes = {id(m): m.weight.quantized_data.clone() for m in linears}
    losses = run(method, model, opt, range(12), tc)
    moved = changed(before, model)
    assert moved and all("lora_" in n for n in moved)
    assert all(torch.equal(m.weight.quantized_data, codes[id(m)]) for m in linears)  # the NF4 base is frozen
    assert losses[-1] < 0.87 * losses[0]


def test_qlora_merged_export_is_plain_bf16_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.methods.qlora import dequantize

    method = build_method("qlora", {"r": 4, "alpha": 8})
    tc = train_config()
    model, opt = setup(method, tiny(2), tc)
    run(method, model, opt, range(3), tc)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = (dequantize(q.base_layer.weight).float()
                  + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight).to(torch.bfloat16)
    ids = task()["input_ids"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    method.save_adapter(model, str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    merged = method.merged_model(model)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any(type(p).__name__ == "NF4Tensor" for p in merged.parameters())
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), expected_q, rtol=0.02,
                               atol=1e-3)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    assert (got - logits).abs().max() < 0.05 * logits.abs().max()


def test_qlora_resume_is_exact():
    assert_resume_exact("qlora", {"r": 4, "alpha": 8}, train_config(), steps=4, split=2)


# -- 8-bit optimizers ------------------------------------------------------------------------------

def test_adamw_8bit_keeps_int8_state_tracks_adamw_and_checkpoints():
    from tunelab.train.optim import build_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(128, 64)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    eight = build_optimizer([{"params": [a], "weight_decay": 0.0}], train_config(optimizer="adamw_8bit", lr=1e-3))
    ref = build_optimizer([{"params": [b], "weight_decay": 0.0}], train_config(lr=1e-3))
    grads = [torch.randn(128, 64) for _ in range(4)]
    for g in grads[:3]:
        a.grad, b.grad = g.clone(), g.clone()
        eight.step()
        ref.step()
    assert eight.state[a]["state1"].dtype == torch.uint8 and eight.state[a]["state2"].dtype == torch.uint8
    upd8, upd32 = a.detach() - w0, b.detach() - w0
    assert float((upd8 - upd32).norm() / upd32.norm()) < 0.05  # blockwise 8-bit moments: close to AdamW
    buf = io.BytesIO()
    torch.save(eight.state_dict(), buf)
    c = torch.nn.Parameter(a.detach().clone())
    again = build_optimizer([{"params": [c], "weight_decay": 0.0}], train_config(optimizer="adamw_8bit", lr=1e-3))
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    a.grad, c.grad = grads[3].clone(), grads[3].clone()
    eight.step()
    again.step()
    assert torch.equal(a, c)


def test_paged_optimizer_falls_back_on_cpu(caplog):
    from tunelab.train.optim import build_optimizer

    p = torch.nn.Parameter(torch.randn(64, 64))
    with caplog.at_level("WARNING"):
        opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], train_config(optimizer="paged_adamw_8bit"))
    assert "paging needs CUDA" in caplog.text
    p.grad = torch.randn(64, 64)
    opt.step()
    assert json.dumps(opt.state_dict()["param_groups"][0]["lr"])  # usable like the others
