"""Initialisations of the LoRA family checked against hand computations on the tiny Llama: PiSSA (top-r SVD of W),
OLoRA (QR of W), EVA (activation SVD), LoRA-GA (full-gradient SVD), CorDA (IPM vs KPM), Gaussian A, DoRA's
magnitude; the conversion that lets PiSSA-style adapters load on the ORIGINAL base; calibration contract."""

from __future__ import annotations

import pytest
import torch
from test_peft_methods import fixed_batch, load_tiny, prepared, sft_logits, train_steps  # noqa: F401

from tunelab.methods._peft_common import CalibrationMissing
from tunelab.methods.registry import build_method


def q_proj(model, layer: int = 0):
    """The PEFT-wrapped q_proj of a decoder layer (base_layer: the frozen Linear, W [64, 64])."""
    return model.base_model.model.model.layers[layer].self_attn.q_proj


def adapter(module):
    A = module.lora_A["default"].weight.detach()  # [r, in]
    B = module.lora_B["default"].weight.detach()  # [out, r]
    return A, B, module.scaling["default"]


def original_q(model_dir, layer: int = 0) -> torch.Tensor:
    return load_tiny(model_dir).model.layers[layer].self_attn.q_proj.weight.detach()


def abs_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u @ v).abs() / (u.norm() * v.norm()))


def test_pissa_adapter_is_the_top_r_svd_part_and_the_residual_is_frozen(tiny_model_dir):
    _, model, _ = prepared("pissa", tiny_model_dir, {"r": 4, "alpha": 8})  # scale 2: B0 A0 = top part / 2
    W = original_q(tiny_model_dir)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    A, B, s = adapter(q_proj(model))
    assert s == 2.0
    torch.testing.assert_close(s * B @ A, top, atol=1e-5, rtol=0)
    torch.testing.assert_close(q_proj(model).base_layer.weight, W - top, atol=1e-5, rtol=0)


def test_olora_adapter_is_the_first_r_qr_columns(tiny_model_dir):
    _, model, _ = prepared("olora", tiny_model_dir, {"r": 4, "alpha": 4})
    W = original_q(tiny_model_dir)
    Q, R = torch.linalg.qr(W)
    A, B, _ = adapter(q_proj(model))
    torch.testing.assert_close(B, Q[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(A, R[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["pissa", "olora", "lora_ga"])
def test_converted_export_needs_the_conversion(name, tiny_model_dir, tmp_path):
    """Read as plain LoRA (W + s B A: vLLM, merging tools, tunelab.merging), the raw adapter is WRONG (it assumes
    W_res); the export is a rank-2r plain LoRA, alpha doubled (same scale), with the fine-tuned logits on the
    original base. (PEFT itself re-runs a deterministic init on load, which only works for exact-SVD PiSSA/OLoRA.)"""
    import json

    from peft import LoraConfig, PeftModel

    opts = {"r": 4, "alpha": 8} | ({"calibration_batches": 1} if name == "lora_ga" else {})
    method, model, _ = prepared(name, tiny_model_dir, opts)
    batch = fixed_batch()
    train_steps(method, model, batch, 3, 1e-2)
    model.eval()
    with torch.no_grad():
        trained = sft_logits(model, batch)
    model.save_pretrained(tmp_path / "raw")  # what a plain save would write
    method.save_adapter(model, str(tmp_path / "converted"))
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    as_plain_lora = LoraConfig.from_pretrained(tmp_path / "raw")
    as_plain_lora.init_lora_weights = True
    with torch.no_grad():
        raw = sft_logits(PeftModel.from_pretrained(load_tiny(tiny_model_dir), tmp_path / "raw", config=as_plain_lora),
                         batch)
        converted = sft_logits(PeftModel.from_pretrained(load_tiny(tiny_model_dir), tmp_path / "converted"), batch)
    assert (raw - trained).abs().max() > 1e-2
    torch.testing.assert_close(converted, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["corda", "eva", "lora_ga"])
def test_data_dependent_inits_require_calibration(name, tiny_model):
    method = build_method(name, {"r": 4})
    assert method.capabilities.needs_calibration and method.n_calibration_batches == 8
    with pytest.raises(CalibrationMissing, match="calibrate"):
        method.prepare(tiny_model)
    with pytest.raises(ValueError, match="input_ids"):
        method.calibrate(tiny_model, [{"chosen_input_ids": torch.ones(1, 3, dtype=torch.long)}])


def test_eva_a0_is_the_top_right_singular_vector_of_the_layer_inputs(tiny_model_dir):
    """A0 rows = principal directions of q_proj's inputs (tokens where labels != -100) on the calibration batches."""
    method, model, _ = prepared("eva", tiny_model_dir, {"r": 4, "rho": 1.0, "calibration_batches": 2})
    base = load_tiny(tiny_model_dir)
    inputs = []
    hook = base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for b in method.calibration_batches:
            base(**b)
            inputs[-1] = inputs[-1][b["labels"] != -100]  # [tokens, 64]
    hook.remove()
    X = torch.cat(inputs)
    X = X - X.mean(0)  # incremental PCA centres the data
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    A, B, _ = adapter(q_proj(model))
    assert torch.equal(B, torch.zeros_like(B))
    # converged to tau=0.99 on a flat spectrum (S: 19.0, 18.4, 17.8, 17.4, 16.3): the first direction is close, and
    # A's rows lie in the top-4 subspace (a random 4-d subspace of R^64 would hold 4/64 of their energy)
    assert abs_cos(A[0], Vh[0]) > 0.98
    energy = (A / A.norm(dim=1, keepdim=True)) @ Vh[:4].T  # [4, 4]
    assert float(energy.pow(2).sum(1).mean()) > 0.9


def test_eva_refuses_batches_too_small_and_stops_when_it_does_not_converge(tiny_model_dir):
    method = build_method("eva", {"r": 4, "rho": 2.0})  # 8 components per layer
    method.calibrate(None, [fixed_batch(rows=1, length=7)])  # 7 tokens with labels
    with pytest.raises(ValueError, match="8 \\(r \\* rho\\) tokens"):
        method.prepare(load_tiny(tiny_model_dir))
    method = build_method("eva", {"r": 4, "rho": 1.0, "tau": 1.0, "max_passes": 2})  # tau=1: never converges
    method.calibrate(None, [fixed_batch(rows=4)])
    with pytest.raises(RuntimeError, match="did not converge"):
        method.prepare(load_tiny(tiny_model_dir))


def test_lora_ga_a0_is_the_top_right_singular_vector_of_the_mean_gradient(tiny_model_dir):
    method, model, _ = prepared("lora_ga", tiny_model_dir, {"r": 4, "alpha": 8, "calibration_batches": 2})
    base = load_tiny(tiny_model_dir)
    W = base.model.layers[0].self_attn.q_proj.weight
    grads = []
    for b in method.calibration_batches:  # mean over batches of the mean-token cross-entropy's gradient
        grads.append(torch.autograd.grad(base(**b).loss, W)[0])
    G = torch.stack(grads).mean(0)  # [64, 64]
    U, S, Vh = torch.linalg.svd(G)
    A, B, s = adapter(q_proj(model))
    assert abs_cos(A[0], Vh[0]) > 0.99  # ArB2r: A from the first r right-singular vectors ...
    assert abs_cos(B[:, 0], U[:, 4]) > 0.99  # ... B from the next r left-singular vectors
    torch.testing.assert_close(q_proj(model).base_layer.weight, W.detach() - s * B @ A, atol=1e-6, rtol=0)


def test_corda_ipm_adapts_the_largest_components_kpm_the_smallest(tiny_model_dir):
    norms = {}
    for mode in ("ipm", "kpm"):
        _, model, _ = prepared("corda", tiny_model_dir, {"r": 4, "alpha": 4, "mode": mode, "calibration_batches": 2})
        A, B, s = adapter(q_proj(model))
        norms[mode] = float((s * B @ A).norm())
    assert norms["ipm"] > 5 * norms["kpm"]


def test_gaussian_init_std_is_one_over_r(tiny_model_dir):
    _, model, _ = prepared("lora_gaussian", tiny_model_dir, {"r": 4, "alpha": 8})
    A = torch.cat([m.lora_A["default"].weight.detach().flatten() for m in model.modules() if hasattr(m, "lora_A")
                   and "default" in m.lora_A])
    assert A.numel() == 2 * 4 * 512  # r * in over 7 linears and 2 layers
    assert abs(float(A.std()) - 1 / 4) < 0.01  # Kaiming-uniform (plain lora) would give ~0.07


def test_dora_magnitude_starts_at_the_row_norms_of_w0(tiny_model_dir):
    _, model, _ = prepared("dora", tiny_model_dir, {"r": 4, "alpha": 8})
    m = q_proj(model).lora_magnitude_vector["default"].weight.detach()  # [out]
    torch.testing.assert_close(m, original_q(tiny_model_dir).norm(dim=1), atol=1e-6, rtol=0)
