"""Checkpoints that survive kills: orphans are cleaned on start, pruning never leaves a half-deleted checkpoint
under its final name, damaged files are named, and a run killed at any point of a checkpoint write resumes
exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab.train.checkpoint import (
    CheckpointError,
    check_resumable,
    clean_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _save(run: Path, step: int, keep: int = 2) -> Path:
    return save_checkpoint(run, step, trainable={"w": torch.full((4,), float(step))},
                           optimizer_state={"state": {}, "param_groups": []}, state={"scheduler": {}},
                           rng_states=[{"torch": torch.get_rng_state()}], keep=keep)


def test_prune_keeps_the_newest_and_leaves_no_temporaries(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_orphans_of_killed_writers_are_removed_on_start(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    (root / "step-000006.tmp-1a2b3c4d").mkdir()  # killed while writing step 6
    (root / "step-000006.tmp-1a2b3c4d" / "trainable.safetensors").write_bytes(b"half")
    (root / "step-000001.old-0badf00d").mkdir()  # killed while pruning
    (root / "latest.tmp-00ff00ff").write_text("step-0000")  # killed while moving the pointer
    (root / "step-000003").mkdir()  # half-deleted by an older version: final name, no state.json
    (root / "step-000003" / "optimizer.pt").write_bytes(b"x")
    removed = clean_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == ["latest.tmp-00ff00ff", "step-000001.old-0badf00d", "step-000003",
                                               "step-000006.tmp-1a2b3c4d"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004"]


def test_a_damaged_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    for garbage in ["../../etc", "step-000009", "", "step-000004/../../x"]:
        (tmp_path / "checkpoints" / "latest").write_text(garbage)
        assert latest_checkpoint(tmp_path).name == "step-000004"


def test_a_damaged_checkpoint_is_named_and_the_intact_one_before_it_offered(tmp_path):
    _save(tmp_path, 2)
    last = _save(tmp_path, 4)
    assert check_resumable(tmp_path) == last and load_checkpoint(last)["state"]["step"] == 4
    data = (last / "trainable.safetensors").read_bytes()
    (last / "trainable.safetensors").write_bytes(data[:-3])
    msg = rf"{last / 'trainable.safetensors'} is damaged: truncated .*previous checkpoint step-000002 is intact.*step 2"
    with pytest.raises(CheckpointError, match=msg):
        check_resumable(tmp_path)
    with pytest.raises(CheckpointError, match="step-000002 is intact"):
        load_checkpoint(last)
    (tmp_path / "checkpoints" / "step-000002" / "optimizer.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no intact checkpoint is left"):
        check_resumable(tmp_path)
