"""core/io.py: the one atomic writer (file, JSON, directory) and orphan cleanup."""

import json

import pytest

from tunelab.core.io import atomic_dir, atomic_file, atomic_write_json, atomic_write_text, is_temporary, remove_orphans


class Boom(Exception):
    pass


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_file_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a" / "x.json"
    atomic_write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    with pytest.raises(Boom):
        with atomic_file(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise Boom()
    assert json.loads(path.read_text()) == {"v": 1}  # the old content, untouched
    assert _names(path.parent) == ["x.json"]  # no temporary left
    atomic_write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode()


def test_file_suffix_for_writers_that_insist_on_one(tmp_path):
    import numpy as np

    with atomic_file(tmp_path / "s.npz", suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz") and is_temporary(tmp)
        np.savez(tmp, a=np.arange(3))
    assert _names(tmp_path) == ["s.npz"]


def test_dir_replace_keep_error(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(Boom):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("2")
            raise Boom()
    assert (out / "f").read_text() == "1" and _names(tmp_path) == ["out"]
    with atomic_dir(out) as tmp:  # replace: the old one is gone, no `.old-` left
        (tmp / "g").write_text("2")
    assert _names(out) == ["g"] and _names(tmp_path) == ["out"]
    with atomic_dir(out, exists="keep") as tmp:  # keep: someone made it first
        (tmp / "h").write_text("3")
    assert _names(out) == ["g"] and _names(tmp_path) == ["out"]
    with pytest.raises(FileExistsError):
        with atomic_dir(out, exists="error"):
            pass
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", exists="error") as tmp:  # an empty directory is not in the way
        (tmp / "i").write_text("4")
    assert _names(tmp_path / "empty") == ["i"]


def test_remove_orphans_only_removes_temporaries(tmp_path):
    (tmp_path / "step-000002.tmp-1a2b3c4d").mkdir()
    (tmp_path / "step-000001.old-1a2b3c4d").mkdir()
    (tmp_path / "latest.tmp-00ff00ff").write_text("x")
    (tmp_path / "step-000003").mkdir()
    (tmp_path / "latest").write_text("step-000003\n")
    removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == ["latest.tmp-00ff00ff", "step-000001.old-1a2b3c4d",
                                               "step-000002.tmp-1a2b3c4d"]
    assert _names(tmp_path) == ["latest", "step-000003"]
