"""Packing changes the layout of a batch, never its loss or gradients."""

import torch

from tunelab.data.batching import collate_packed, collate_sft, pack_rows
from tunelab.objectives.base import build_objective


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 4, 2, 6], capacity=8)
    assert sorted(sorted(r) for r in rows) == [[0, 1], [2], [3, 4]]  # 6+2, 5+3, 4
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows)


def test_packed_layout():
    b = collate_packed([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                        {"input_ids": [8, 9], "labels": [8, 9]}], pad_id=0, pack_length=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # the first label of each example is masked: it would be "predicted" from the previous example
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert b["real_token_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]
    # documents (the padding tail one of its own) for tunelab's attention: flat positions, right-padded
    assert b["document_index"].tolist() == [[0, 1, 2], [3, 4, 3], [5, 5, 5]]
    assert b["document_slot"].tolist() == [0, 1, 2, 3, 4, 6]


def test_padding_free_is_one_row_of_exactly_the_tokens():
    from tunelab.data.batching import make_collator
    from tunelab.recipe import DataConfig

    collate = make_collator("sft", DataConfig(padding_free=True))
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert b["document_index"].tolist() == [[0, 1, 2], [3, 4, 3]]


def test_packed_loss_and_grads_equal_padded(tiny_model):
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 12, 5, 9, 16):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    sft = build_objective("sft", {})

    def run(batch):
        tiny_model.zero_grad()
        out = sft.compute(tiny_model, batch)
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    padded, g_pad = run(collate_sft(examples, pad_id=2))
    packed_batch = collate_packed(examples, pad_id=2, pack_length=24)
    assert packed_batch["input_ids"].shape[0] < len(examples)  # really packed
    packed, g_pack = run(packed_batch)
    assert int(packed.n_units) == int(padded.n_units)
    torch.testing.assert_close(packed.loss_sum, padded.loss_sum, rtol=1e-5, atol=1e-5)
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-5)


def test_packed_weighted_loss_and_grads_equal_padded(tiny_model):
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        w = torch.rand(n, generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:],
                         "loss_weights": [0.0] * (n // 2) + w[n // 2:]})
    sft = build_objective("weighted_sft", {})

    def run(batch):
        tiny_model.zero_grad()
        out = sft.compute(tiny_model, batch)
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    padded, g_pad = run(collate_sft(examples, pad_id=2))
    packed, g_pack = run(collate_packed(examples, pad_id=2, pack_length=24))
    unweighted = build_objective("sft", {"loss_weights": "ignore"}).compute(tiny_model, collate_sft(examples, 2))
    assert abs(float(padded.loss_sum - unweighted.loss_sum)) > 1e-3  # the weights matter
    torch.testing.assert_close(packed.loss_sum, padded.loss_sum, rtol=1e-5, atol=1e-5)
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-5)
