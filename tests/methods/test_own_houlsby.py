"""Houlsby adapters: placement, count, the residual bottleneck by hand, and the export story."""

import pytest
import torch
from test_own_common import logits, n_trainable, prepared, trainable_names

from tunelab.methods.houlsby import BottleneckAdapter


def test_count_and_placement():
    m = 8
    method, model = prepared("houlsby", {"bottleneck": m})
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    per_adapter = 2 * d * m + m + d  # W_down [m, d] + b_down [m] + W_up [d, m] + b_up [d]
    assert n_trainable(model) == layers * 2 * per_adapter == 4 * 1096
    wrapped = {n for n, mod in model.named_modules() if isinstance(mod, BottleneckAdapter)}
    assert wrapped == {f"model.layers.{i}.{s}" for i in range(layers) for s in ("self_attn.o_proj", "mlp.down_proj")}
    assert all(".adapter_" in n for n in trainable_names(model))
    _, mlp_only = prepared("houlsby", {"bottleneck": m, "placement": ["mlp"], "layers": [-1]})
    assert n_trainable(mlp_only) == per_adapter
    assert [n for n, mod in mlp_only.named_modules() if isinstance(mod, BottleneckAdapter)] == [
        "model.layers.1.mlp.down_proj"]


def test_adapter_by_hand():
    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    ad = BottleneckAdapter(base, bottleneck=1, activation="relu")
    x = torch.tensor([[1.0, 1.0]])
    assert torch.equal(ad(x).detach(), torch.tensor([[1.0, 2.0]]))  # W_up = 0: exactly the sublayer output
    with torch.no_grad():
        ad.adapter_down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        ad.adapter_down.bias.fill_(3.0)
        ad.adapter_up.weight.copy_(torch.tensor([[2.0], [0.5]]))
        ad.adapter_up.bias.copy_(torch.tensor([0.0, 1.0]))
    # h = [1, 2]; down: 1 - 2 + 3 = 2; relu 2; up: [4, 1] + [0, 1] = [4, 2]; h + that = [5, 4]
    assert torch.equal(ad(x).detach(), torch.tensor([[5.0, 4.0]]))
    h_neg = torch.tensor([[0.0, 5.0]])  # down: -10 + 3 = -7 -> relu 0 -> only b_up
    assert torch.equal(ad(h_neg).detach(), torch.tensor([[0.0, 10.0]]) + torch.tensor([[0.0, 1.0]]))


def test_merged_export_refused_with_a_clear_message():
    method, model = prepared("houlsby")
    ref = logits(model)
    with pytest.raises(Exception) as e:
        method.merged_model(model)
    assert type(e.value).__name__ == "ExportUnsupported"
    assert "nonlinear" in str(e.value) and "adapter export" in str(e.value)
    assert torch.equal(logits(model), ref)
