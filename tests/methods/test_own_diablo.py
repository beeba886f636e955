"""DiaBlo: the block-diagonal structure by hand, its gradient is the diagonal blocks of the full gradient, the count."""

import pytest
import torch
from test_own_common import linear_shapes, n_trainable, prepared, trainable_names

from tunelab.methods.diablo import DiaBloLinear


def test_block_structure_by_hand():
    base = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.arange(24.0).view(4, 6) / 10)
    dia = DiaBloLinear(base, num_blocks=2)
    assert dia.diablo_blocks.shape == (2, 2, 3) and not dia.diablo_blocks.any()
    with torch.no_grad():
        dia.diablo_blocks.copy_(torch.arange(1.0, 13.0).view(2, 2, 3))
    expected = torch.tensor([[1.0, 2, 3, 0, 0, 0],
                             [4, 5, 6, 0, 0, 0],
                             [0, 0, 0, 7, 8, 9],
                             [0, 0, 0, 10, 11, 12]])
    assert torch.equal(dia.delta(), expected)
    x = torch.tensor([[1.0, 0, 0, 0, 0, 1], [0, 1, 0, 2, 0, 0]])
    # row 1: delta x = [1, 4, 9, 12]; row 2: [2, 5, 14, 20]
    want = x @ base.weight.T + torch.tensor([[1.0, 4, 9, 12], [2, 5, 14, 20]])
    torch.testing.assert_close(dia(x).detach(), want)
    folded = dia.fold()
    assert type(folded) is torch.nn.Linear and torch.equal(folded.weight, base.weight + expected)


def test_gradient_is_the_diagonal_blocks_of_the_full_gradient():
    torch.manual_seed(0)
    full = torch.nn.Linear(8, 12)
    dia = DiaBloLinear(torch.nn.Linear(8, 12), num_blocks=4)
    dia.base.load_state_dict(full.state_dict())
    x = torch.randn(5, 8)
    (full(x).sin().sum()).backward()
    (dia(x).sin().sum()).backward()
    g = full.weight.grad  # [12, 8]; block k = rows 3k:3k+3, columns 2k:2k+2
    for k in range(4):
        torch.testing.assert_close(dia.diablo_blocks.grad[k], g[3 * k:3 * k + 3, 2 * k:2 * k + 2])
    assert dia.base.weight.grad is None


def test_count_and_divisibility():
    method, model = prepared("diablo", {"num_blocks": 8})
    layers = model.config.num_hidden_layers
    assert n_trainable(model) == layers * sum(o * i for o, i in linear_shapes(model).values()) // 8 == 9216
    assert {n.rsplit(".", 1)[-1] for n in trainable_names(model)} == {"diablo_blocks"}
    with pytest.raises(ValueError, match="num_blocks=3 must divide.*q_proj"):
        prepared("diablo", {"num_blocks": 3})
