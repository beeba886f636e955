"""Delta norm, effective rank and intruder dimensions on constructed matrices."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.evaluate.diagnostics import diagnose_state_dicts, effective_rank, intruder_dimensions, matrix_diagnostics


def orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def base_matrix(n=16, seed=0):
    u, v = orthonormal(n, seed), orthonormal(n, seed + 1)
    s = torch.linspace(4.0, 0.5, n, dtype=torch.float64)  # distinct singular values
    return u, s, v, u @ torch.diag(s) @ v.T


def test_effective_rank_hand_values():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.tensor([5.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_planted_new_direction_is_one_intruder():
    u, s, v, w0 = base_matrix()
    n = w0.shape[0]
    # a unit direction spread evenly over all base singular vectors: |cos| with each is 1/sqrt(n) = 0.25
    u_new = u @ torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
    v_new = v[:, -1]  # the base's weakest input direction, so W v_new is almost all u_new
    w = w0 + 20.0 * torch.outer(u_new, v_new)  # large: it becomes the top singular direction
    out = intruder_dimensions(w0, w, k=5, threshold=0.5)
    assert out["count"] == 1 and out["indices"] == [0]
    assert out["max_cos"][0] < 0.3
    assert all(c > 0.5 for c in out["max_cos"][1:])
    diag = matrix_diagnostics(w0, w, k=5, threshold=0.5)
    assert diag["intruders"] == 1
    assert diag["delta_norm"] == pytest.approx(20.0)  # ||20 u v^T||_F with unit u, v
    assert diag["effective_rank"] == pytest.approx(1.0)  # a rank-1 delta
    assert diag["rel_delta"] == pytest.approx(20.0 / float(w0.norm()))


def test_full_finetune_like_changes_have_no_intruders():
    u, s, v, w0 = base_matrix()
    rescaled = u @ torch.diag(s * torch.linspace(1.5, 0.8, len(s), dtype=torch.float64)) @ v.T
    noisy = w0 + 0.01 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for w in (rescaled, noisy):
        assert intruder_dimensions(w0, w, k=10, threshold=0.5)["count"] == 0
    # a new direction small enough to stay out of the top k is not counted either
    u_new = u @ torch.full((16,), 0.25, dtype=torch.float64)
    assert intruder_dimensions(w0, w0 + 0.1 * torch.outer(u_new, v[:, 0]), k=5)["count"] == 0


def test_base_k_restricts_comparison():
    # tuned's top vector is base's 8th singular vector promoted: not new against all base vectors, but new
    # against base's top 4
    u, s, v, w0 = base_matrix()
    w = w0 + 20.0 * torch.outer(u[:, 7], v[:, 7])
    assert intruder_dimensions(w0, w, k=3)["count"] == 0
    assert intruder_dimensions(w0, w, k=3, base_k=4)["count"] == 1


def test_state_dict_summary_per_layer_and_matrix():
    _, _, _, w0 = base_matrix(8)
    u = orthonormal(8, 9)
    base = {"model.layers.0.self_attn.q_proj.weight": w0, "model.layers.1.mlp.up_proj.weight": w0.clone(),
            "model.layers.0.input_layernorm.weight": torch.ones(8), "model.embed_tokens.weight": torch.randn(20, 8)}
    tuned = dict(base)
    tuned["model.layers.1.mlp.up_proj.weight"] = w0 + 3.0 * torch.outer(u[:, 0], u[:, 1]) \
        + 4.0 * torch.outer(u[:, 2], u[:, 3])  # rank-2 delta, Frobenius norm 5
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 1  # excluded by default
    out = diagnose_state_dicts(base, tuned, k=4)
    rows = {r["name"]: r for r in out["matrices"]}
    assert set(rows) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    changed = rows["model.layers.1.mlp.up_proj.weight"]
    assert (changed["layer"], changed["module"]) == (1, "mlp.up_proj")
    assert changed["delta_norm"] == pytest.approx(5.0)
    p = torch.tensor([4 / 7, 3 / 7])
    assert changed["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert rows["model.layers.0.self_attn.q_proj.weight"]["delta_norm"] == 0.0
    assert out["summary"]["matrices"] == 2 and out["summary"]["changed"] == 1
    assert out["summary"]["total_delta_norm"] == pytest.approx(5.0)
