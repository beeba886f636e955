"""core/rundir.py: run names stay one path component, --overwrite deletes only run directories, one writer
at a time (a second process is refused, a stale lock from a killed one is taken over), unstarted runs leave
nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tiny import tiny_recipe_dict

from tunelab.core.rundir import (
    LOCK_NAME,
    MetricsLog,
    RunDirError,
    RunLocked,
    check_component,
    discard_if_unstarted,
    invocation,
    lock_of,
    lock_run_dir,
    new_run_dir,
    release_run_dir,
    write_json,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")

TRAVERSALS = ["..", ".", "../x", "../../escaped", "/etc", "/tmp/abs", "a/b", "a/../../b", "a\\b", "..\\..\\x", "",
              ".hidden", "x\x00y", "x\ny", "run.tmp-1234", "run.old-1234", "é" * 128]
GOOD_NAMES = ["run", "lora-r16", "my run", "$x^2$", "ünïcode", "r" * 255, "-dash"]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_names_are_refused_and_nothing_is_created(name, tmp_path):
    out = tmp_path / "a" / "runs"
    out.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("x")
    before = _tree(tmp_path)
    with pytest.raises(RunDirError, match="run name"):
        check_component(name)
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunDirError, match="run name"):
            new_run_dir(out, name, **kwargs)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", TRAVERSALS)
def test_recipe_refuses_traversal_names(name):
    from pydantic import ValidationError

    from tunelab.recipe import Recipe, format_validation_error

    with pytest.raises(ValidationError) as e:
        Recipe(name=name)
    assert format_validation_error(e.value).startswith("recipe field 'name': run name")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_are_accepted_and_stay_inside(name, tmp_path):
    run = new_run_dir(tmp_path / "runs", name)
    try:
        assert run.parent == (tmp_path / "runs").absolute() and run.name == name and run.is_dir()
    finally:
        release_run_dir(run)


def test_names_in_use_get_a_suffix_and_are_never_overwritten(tmp_path):
    first = new_run_dir(tmp_path, "r")
    (first / "recipe.yaml").write_text("a")
    second = new_run_dir(tmp_path, "r")
    assert (first.name, second.name) == ("r", "r-2") and (first / "recipe.yaml").read_text() == "a"
    for d in (first, second):
        release_run_dir(d)


def test_overwrite_replaces_only_a_run_directory(tmp_path):
    out = tmp_path / "runs"
    run = new_run_dir(out, "r")
    (run / "recipe.yaml").write_text("old")
    (run / "checkpoints").mkdir()
    release_run_dir(run)
    again = new_run_dir(out, "r", overwrite=True)
    assert again == run and list(again.iterdir()) == [again / LOCK_NAME]  # fresh, and locked by us
    assert sorted(p.name for p in out.iterdir()) == ["r"]  # the old one deleted, no `.old-` left
    release_run_dir(again)


def test_overwrite_never_deletes_outside_a_run_directory(tmp_path):
    out = tmp_path / "runs"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "thesis.tex").write_text("my only copy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "recipe.yaml").write_text("a run somewhere else")
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    (out / "afile").write_text("not a directory")
    before = _tree(tmp_path)
    with pytest.raises(RunDirError, match="not a tunelab run directory"):
        new_run_dir(out, "notes", overwrite=True)
    with pytest.raises(RunDirError, match="symbolic link"):
        new_run_dir(out, "link", overwrite=True)
    with pytest.raises(RunDirError, match="symbolic link"):
        new_run_dir(out, "link", resume=True)
    with pytest.raises(RunDirError, match="output_dir"):
        new_run_dir(out / "afile", "r", overwrite=True)
    assert _tree(tmp_path) == before
    # a name in use by a plain file: a new suffixed directory, the file untouched
    run = new_run_dir(out, "afile")
    assert run.name == "afile-2" and (out / "afile").read_text() == "not a directory"
    release_run_dir(run)


def test_write_json_stays_inside_the_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for bad in ["../x.json", "/tmp/x.json", "a/../../b.json", "", ".hidden.json"]:
        with pytest.raises(RunDirError):
            write_json(run, bad, {})
    assert _tree(tmp_path) == ["run"]
    assert write_json(run, "eval_suite_after.json", {"a": 1}) == run / "eval_suite_after.json"


def test_an_unstarted_run_created_by_a_failed_invocation_is_removed(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ValueError):
        with invocation():
            run = new_run_dir(out, "r")
            (run / "recipe.yaml").write_text("x")
            raise ValueError("data is bad")
    assert list(out.iterdir()) == []
    # once a step is logged the run holds work: kept (and unlocked)
    with pytest.raises(ValueError):
        with invocation():
            run = new_run_dir(out, "r")
            MetricsLog(run).write({"step": 1, "loss": 2.0})
            raise ValueError("diverged")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"] and lock_of(run) is None
    # a directory this process did not create is never discarded
    assert not discard_if_unstarted(run)


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    log = MetricsLog(tmp_path)
    for s in (1, 2, 3):
        log.write({"step": s, "loss": 1.0 / s})
    with log.path.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-append
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.truncate_after(2)
    assert log.path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


# -- locks ------------------------------------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    from tunelab.core.rundir import lock_run_dir
    lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (killed with SIGKILL at the end, or by the test)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "model", tmp_path, name="run")))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(holder, tmp_path):
    run, proc = holder
    recipe = (run / "recipe.yaml").read_text()
    info = json.loads((run / LOCK_NAME).read_text())
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    msg = rf"in use by pid {proc.pid} on host {socket.gethostname()}"
    with pytest.raises(RunLocked, match=msg):
        lock_run_dir(run)
    with pytest.raises(RunLocked, match=msg):
        new_run_dir(tmp_path, "run", resume=True)
    with pytest.raises(RunLocked, match=msg):
        new_run_dir(tmp_path, "run", overwrite=True)  # --overwrite while another process trains there
    assert (run / "recipe.yaml").read_text() == recipe and lock_of(run) is None


def test_a_second_writer_through_the_cli_gets_one_clean_line(holder, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run, proc = holder
    res = CliRunner().invoke(app, ["train", str(run), "--resume"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"error: run directory {run.resolve()} is in use by pid {proc.pid}" in res.output


def test_a_stale_lock_of_a_killed_process_is_taken_over(holder, caplog):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the lock file stays behind
    proc.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level("WARNING", logger="tunelab"):
        lock = lock_run_dir(run)
    assert f"stale lock of pid {proc.pid}" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_lock_file_naming_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = lock_run_dir(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_holder(tmp_path):
    a = lock_run_dir(tmp_path)
    b = lock_run_dir(tmp_path)
    assert a is b and a.count == 2
    a.release()
    assert (tmp_path / LOCK_NAME).exists() and lock_of(tmp_path) is a
    b.release()
    assert not (tmp_path / LOCK_NAME).exists() and lock_of(tmp_path) is None
    a.release()  # a stale handle does nothing, even once the directory is locked anew
    c = lock_run_dir(tmp_path)
    a.release()
    assert lock_of(tmp_path) is c
    c.release()
    # and once released, another process can take it
    out = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), str(tmp_path)],
                         env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "locked", out.stderr
