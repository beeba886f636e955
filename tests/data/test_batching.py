import pytest
import torch

from tunelab.data.batching import StepSampler, collate_preference, collate_sft


def test_collate_sft_pads_right_and_masks():
    b = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_preference_shares_width():
    b = collate_preference([{"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2],
                             "rejected_input_ids": [1, 2, 3], "rejected_labels": [-100, 2, 3]}], pad_id=0)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == torch.Size([1, 3])
    assert b["chosen_labels"].tolist() == [[-100, 2, -100]]


def test_one_process_with_accumulation_sees_what_two_processes_see():
    one = StepSampler(10, micro_batch=2, grad_accum=2, world_size=1, rank=0, seed=3)
    r0 = StepSampler(10, micro_batch=2, grad_accum=1, world_size=2, rank=0, seed=3)
    r1 = StepSampler(10, micro_batch=2, grad_accum=1, world_size=2, rank=1, seed=3)
    for step in range(6):  # crosses epoch boundaries
        a = one.micro_batches(step)
        assert a == [r0.micro_batches(step)[0], r1.micro_batches(step)[0]]


def test_epochs_are_permutations_and_deterministic():
    s = StepSampler(8, micro_batch=4, grad_accum=1, world_size=1, rank=0, seed=1)
    first_epoch = s.global_indices(0) + s.global_indices(1)
    assert sorted(first_epoch) == list(range(8))
    assert StepSampler(8, 4, 1, 1, 0, seed=1).global_indices(1) == s.global_indices(1)
    assert StepSampler(8, 4, 1, 1, 0, seed=2).global_indices(0) != s.global_indices(0)
    assert s.steps_for_epochs(2.0) == 4


def test_collate_sft_carries_loss_weights():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "loss_weights": [0.0, 0.5, 2.0]}
    b = {"input_ids": [8, 9], "labels": [-100, 9], "loss_weights": [0.0, 1.0]}
    out = collate_sft([a, b], pad_id=0)
    assert out["loss_weights"].dtype == torch.float32
    assert out["loss_weights"].tolist() == [[0.0, 0.5, 2.0], [0.0, 1.0, 0.0]]  # aligned with labels, 0 on padding
    assert "loss_weights" not in collate_sft([{"input_ids": [1, 2], "labels": [1, 2]}], pad_id=0)
    with pytest.raises(ValueError, match="some examples of the batch carry per-token loss_weights"):
        collate_sft([a, {"input_ids": [8, 9], "labels": [-100, 9]}], pad_id=0)


def test_collate_preference_carries_cached_reference_logps():
    pair = {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3],
            "rejected_labels": [-100, 3]}
    out = collate_preference([{**pair, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}] * 2, pad_id=0)
    assert out["ref_chosen_logps"].tolist() == [-1.5, -1.5] and out["ref_rejected_logps"].dtype == torch.float32
    assert "ref_chosen_logps" not in collate_preference([pair], pad_id=0)
    with pytest.raises(ValueError, match="cached reference log-probs"):
        collate_preference([pair, {**pair, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}], pad_id=0)
