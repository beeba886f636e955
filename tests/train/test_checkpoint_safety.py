"""Checkpoints that survive kills: orphans are cleaned on start, pruning never leaves a half-deleted checkpoint
under its final name, damaged files are named, and a run killed at any point of a checkpoint write resumes
exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_recipe_dict

from tunelab.core.io import is_temporary
from tunelab.recipe import Recipe
from tunelab.runner import open_workspace, train_workspace
from tunelab.train.checkpoint import (
    STEP_DIR,
    CheckpointError,
    check_resumable,
    checkpoint_problem,
    clean_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


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


# -- kill -9 at every file-system step of a checkpoint write, then resume ------------------------------------

CHILD = textwrap.dedent("""
    # Train; during checkpoint save number SAVE, SIGKILL this process right before its file operation number OP
    # (or, for OP == 0, halfway through deleting the pruned checkpoint).
    import os, shutil, signal, sys
    import torch
    torch.set_num_threads(1)
    import yaml
    import tunelab.train.checkpoint as ck
    from tunelab.recipe import Recipe
    from tunelab.runner import open_workspace, train_workspace

    recipe_path, SAVE, OP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = {"save": 0, "op": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def op(fn):
        def wrapped(*a, **k):
            if state["save"] == SAVE:
                state["op"] += 1
                if state["op"] == OP:
                    die()
            return fn(*a, **k)
        return wrapped

    def half_rmtree(path, *a, **k):
        if state["save"] == SAVE and OP == 0:
            files = sorted(p.path for p in os.scandir(path) if p.is_file())
            os.unlink(files[0])  # one file gone, the rest still there
            die()
        return real_rmtree(path, *a, **k)

    real_save = ck.save_checkpoint
    def save(*a, **k):
        state["save"] += 1
        return real_save(*a, **k)

    real_rmtree = shutil.rmtree
    ck.save_checkpoint, ck.save_file, torch.save = save, op(ck.save_file), op(torch.save)
    os.rename, os.replace, shutil.rmtree = op(os.rename), op(os.replace), half_rmtree
    ws = open_workspace(Recipe.model_validate(yaml.safe_load(open(recipe_path))))
    train_workspace(ws)
    print("finished without being killed")
""")
# save_checkpoint's file operations, in order (keep_checkpoints=2, so save 3 also prunes step 1):
# 1 trainable.safetensors, 2 optimizer.pt, 3 rng-0.pt, 4 rename step-N.tmp-* -> step-N,
# 5 replace latest.tmp-* -> latest, 6 rename step-(N-2) -> step-(N-2).old-*, then rmtree of it (0: halfway)
# (ops 1-3 all write inside the temporary directory: one of them stands for the three)
KILL_POINTS = [(1, 4), (1, 5), (3, 2), (3, 4), (3, 5), (3, 6), (3, 0), (5, 6)]


def _recipe(model_dir: Path, out: Path) -> dict:
    r = tiny_recipe_dict(model_dir, out, name="k", data={"eval": None},
                         train={"max_steps": 6, "save_every": 1, "keep_checkpoints": 2, "lr": 5e-3})
    r["method"]["dropout"] = 0.1  # the RNG state matters too
    return r


@pytest.mark.slow
def test_killed_during_checkpoint_writes_and_pruning_resumes_exactly(tiny_model_dir, tmp_path):
    ref = open_workspace(Recipe.model_validate(_recipe(tiny_model_dir, tmp_path / "ref")))
    _, full, _ = train_workspace(ref)
    assert len(full.losses) == 6
    results = []
    for save_no, op_no in KILL_POINTS:
        out = tmp_path / f"kill-{save_no}-{op_no}"
        recipe = out / "recipe.yaml"
        out.mkdir()
        recipe.write_text(yaml.safe_dump(_recipe(tiny_model_dir, out / "runs")))
        child = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(save_no), str(op_no)],
                               env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True, timeout=600)
        assert child.returncode == -9, (save_no, op_no, child.stdout, child.stderr[-3000:])
        run = out / "runs" / "k"
        root = run / "checkpoints"
        # nothing half-written or half-deleted carries a final name; the latest checkpoint loads
        finals = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name)]
        assert all(checkpoint_problem(p) is None for p in finals), (save_no, op_no, sorted(root.iterdir()))
        latest = check_resumable(run)  # None: killed before the first checkpoint was in place
        assert (latest is None) == (save_no == 1 and op_no <= 4), (save_no, op_no)
        if latest is not None:
            assert load_checkpoint(latest)["state"]["step"] == int(latest.name[5:])
        orphans = sorted(p.name for p in root.rglob("*") if is_temporary(p))
        # the next start cleans the orphans (under the dead run's stale lock, taken over) and resumes exactly
        r = Recipe.model_validate(yaml.safe_load(recipe.read_text()))
        ws = open_workspace(r, run_dir=run, resume=True)
        assert not [p for p in run.rglob("*") if is_temporary(p)]
        assert json.loads((run / ".tunelab.lock").read_text())["pid"] == os.getpid()
        _, resumed, _ = train_workspace(ws, resume=True)
        curve = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert curve == full.losses, (save_no, op_no, latest)
        results.append((save_no, op_no, latest.name if latest else "the start", orphans))
        del ws
    # every kill point left something to clean or a checkpoint to fall back to: the loop tested what it claims
    assert any(o for *_, o in results) and len({r[2] for r in results}) > 1
    print("\n".join(f"save {s} op {o}: resumed from {name}, orphans {orph}" for s, o, name, orph in results))
