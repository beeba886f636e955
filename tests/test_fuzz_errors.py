"""Ordinary mistakes end in one clean line, not a traceback, and leave the file system as it was.

A table of bad inputs and fault injections (recipes, run names, models, data, checkpoints, CLI arguments),
each run through the CLI in this process (typer's CliRunner). Every case must
  * exit with status 2 and no exception escaping the command (no traceback);
  * print exactly one `error:` line that names the file, field or line (the case's `expect` strings);
  * leave its workspace exactly as it was: the same files with the same bytes (no run directory, no
    `recipe.yaml`, no lock file, no temporary file left behind).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from tiny import tiny_recipe_dict
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


@dataclass
class Ctx:
    """One case's workspace `ws` (compared before/after), plus the shared tiny model and trained run."""

    ws: Path
    model_dir: Path
    trained_run: Path

    def recipe(self, name: str = "recipe.yaml", **sections) -> Path:
        p = self.ws / name
        p.write_text(yaml.safe_dump(tiny_recipe_dict(self.model_dir, self.ws / "runs", **sections)))
        return p

    def data(self, name: str, content: str | bytes) -> Path:
        p = self.ws / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model_dir, self.ws / "model"))

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.trained_run, self.ws / "runs" / "trained", symlinks=True))


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # writes the case's files into ctx.ws, returns the CLI arguments
    expect: Callable[[Ctx], list[str]] = field(default=lambda c: [])  # strings the error line must contain


GOOD_ROWS = "".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": str(2 * i)}) + "\n" for i in range(8))
PAIRS = "".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
                for i in range(8))


def _run(ctx: Ctx, *overrides: str, cmd: str = "train", **sections) -> list[str]:
    return [cmd, str(ctx.recipe(**sections)), *overrides]


def _data_run(content: str | bytes, name: str = "d.jsonl", **sections):
    return lambda c: _run(c, data={"train": {"path": str(c.data(name, content))}}, **sections)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_ckpt(file: str, how: Callable[[Path], None]):
    def setup(c: Ctx) -> list[str]:
        run = c.run_copy()
        how(run / "checkpoints" / "step-000004" / file)
        return ["train", str(run), "--resume"]
    return setup


def _not_a_run_dir(c: Ctx) -> list[str]:
    (c.ws / "runs" / "tiny").mkdir(parents=True)
    (c.ws / "runs" / "tiny" / "thesis.tex").write_text("my only copy")
    return _run(c, "--overwrite")


def _symlinked_run(c: Ctx) -> list[str]:
    target = c.run_copy()
    (c.ws / "runs" / "tiny").symlink_to(target, target_is_directory=True)
    return _run(c, "--overwrite")


def _dir_without_recipe(c: Ctx) -> list[str]:
    (c.ws / "somedir").mkdir()
    return ["run", str(c.ws / "somedir")]


def _empty_model_dir(c: Ctx) -> list[str]:
    (c.ws / "emptymodel").mkdir()
    return _run(c, f"model.name_or_path={c.ws / 'emptymodel'}")


def _model_with(edit: Callable[[Path], None]):
    def setup(c: Ctx) -> list[str]:
        m = c.model_copy()
        edit(m)
        return _run(c, f"model.name_or_path={m}")
    return setup


def _bad_recipe_yaml_in_run(c: Ctx) -> list[str]:
    run = c.run_copy()
    (run / "recipe.yaml").write_text("train: [unclosed\n")
    return ["train", str(run)]


def _label_escape(c: Ctx) -> list[str]:
    return ["eval", str(c.run_copy()), "--tasks", "date_format", "--n", "2", "--label", "../../escaped"]


CASES = [
    # -- run names and run directories ------------------------------------------------------------------
    Case("name-traversal", lambda c: _run(c, "name=../../escaped"), lambda c: ["'name'", "../../escaped"]),
    Case("name-absolute", lambda c: _run(c, f"name={c.ws / 'abs'}"), lambda c: ["'name'"]),
    Case("name-nested", lambda c: _run(c, "name=a/b"), lambda c: ["'name'", "a/b"]),
    Case("name-empty", lambda c: _run(c, "name="), lambda c: ["'name'"]),
    Case("name-dotdot", lambda c: _run(c, "name=.."), lambda c: ["'name'"]),
    Case("name-dot", lambda c: _run(c, "name=."), lambda c: ["'name'"]),
    Case("name-hidden", lambda c: _run(c, "name=.hidden"), lambda c: ["'name'"]),
    Case("name-temporary-mark", lambda c: _run(c, "name=x.tmp-1234"), lambda c: ["'name'"]),
    Case("name-backslash", lambda c: _run(c, "name=a\\b"), lambda c: ["'name'"]),
    Case("overwrite-not-a-run", _not_a_run_dir, lambda c: [str(c.ws / "runs" / "tiny"), "not a tunelab run directory"]),
    Case("overwrite-symlink", _symlinked_run, lambda c: [str(c.ws / "runs" / "tiny"), "symbolic link"]),
    Case("output-dir-is-a-file", lambda c: (c.data("afile", "x"), _run(c, f"output_dir={c.ws / 'afile'}"))[1],
         lambda c: ["output_dir", str(c.ws / "afile")]),
    Case("resume-missing-run", lambda c: _run(c, "--resume"), lambda c: [str(c.ws / "runs" / "tiny"), "--resume"]),
    # -- recipes and overrides ----------------------------------------------------------------------------
    Case("recipe-missing", lambda c: ["train", str(c.ws / "nope.yaml")], lambda c: [str(c.ws / "nope.yaml")]),
    Case("recipe-latin1", lambda c: ["train", str(c.data("r.yaml", "name: caf\xe9\n".encode("latin-1")))],
         lambda c: [str(c.ws / "r.yaml"), "UTF-8"]),
    Case("recipe-bad-yaml", lambda c: ["train", str(c.data("r.yaml", "train: [1, 2\n"))],
         lambda c: [str(c.ws / "r.yaml"), "YAML"]),
    Case("recipe-not-mapping", lambda c: ["train", str(c.data("r.yaml", "- a\n- b\n"))],
         lambda c: [str(c.ws / "r.yaml")]),
    Case("recipe-unknown-field", lambda c: _run(c, "train.bogus=1"), lambda c: ["'train.bogus'"]),
    Case("recipe-bad-type", lambda c: _run(c, "train.lr=abc"), lambda c: ["'train.lr'"]),
    Case("recipe-unknown-method", lambda c: _run(c, "method.name=nosuch"), lambda c: ["'method.name'", "nosuch"]),
    Case("recipe-unknown-objective", lambda c: _run(c, "objective.name=nosuch"), lambda c: ["'objective.name'"]),
    Case("recipe-bad-method-option", lambda c: _run(c, "method.r=zero"), lambda c: ["'method.r'"]),
    Case("override-into-value", lambda c: _run(c, "train.lr.x=1"), lambda c: ["train.lr.x=1", "'lr'"]),
    Case("override-empty-key", lambda c: _run(c, "train..lr=1"), lambda c: ["train..lr=1"]),
    Case("directory-without-recipe", _dir_without_recipe, lambda c: [str(c.ws / "somedir"), "recipe.yaml"]),
    Case("run-dir-bad-recipe", _bad_recipe_yaml_in_run, lambda c: [str(c.ws / "runs" / "trained" / "recipe.yaml")]),
    # -- models -------------------------------------------------------------------------------------------------
    Case("model-dir-missing", lambda c: _run(c, f"model.name_or_path={c.ws / 'no' / 'such' / 'dir'}"),
         lambda c: ["model.name_or_path", str(c.ws / "no" / "such" / "dir")]),
    Case("model-hub-id-offline", lambda c: _run(c, "model.name_or_path=someone/nomodel"),
         lambda c: ["model.name_or_path", "someone/nomodel", "offline"]),
    Case("model-dir-empty", _empty_model_dir, lambda c: [str(c.ws / "emptymodel"), "config.json"]),
    Case("model-truncated-safetensors", _model_with(lambda m: _truncate(m / "model.safetensors")),
         lambda c: [str(c.ws / "model" / "model.safetensors")]),
    Case("model-bad-config-json", _model_with(lambda m: (m / "config.json").write_text("{not json")),
         lambda c: [str(c.ws / "model" / "config.json")]),
    Case("model-gguf-missing", lambda c: _run(c, f"model.name_or_path={c.ws / 'm.gguf'}"),
         lambda c: [str(c.ws / "m.gguf")]),
    Case("model-plain-file", lambda c: _run(c, f"model.name_or_path={c.data('weights.bin', b'0' * 64)}"),
         lambda c: ["model.name_or_path", str(c.ws / "weights.bin")]),
    # -- data ------------------------------------------------------------------------------------------------------
    Case("data-missing", lambda c: _run(c, data={"train": {"path": str(c.ws / "none.jsonl")}}),
         lambda c: [str(c.ws / "none.jsonl")]),
    Case("data-binary", _data_run(bytes(range(256)) * 8), lambda c: [f"{c.ws / 'd.jsonl'}:1"]),
    Case("data-latin1", _data_run((GOOD_ROWS + '{"prompt": "caf\xe9", "completion": "x"}\n').encode("latin-1")),
         lambda c: [f"{c.ws / 'd.jsonl'}:9", "UTF-8"]),
    Case("data-latin1-json", _data_run('[{"prompt": "caf\xe9", "completion": "x"}]'.encode("latin-1"), "d.json"),
         lambda c: [f"{c.ws / 'd.json'}:1", "UTF-8"]),
    Case("data-type-differs", _data_run(GOOD_ROWS + '{"prompt": "a", "completion": 5}\n'),
         lambda c: [f"{c.ws / 'd.jsonl'}:9", "'completion'"]),
    Case("data-type-differs-json", _data_run(json.dumps([{"prompt": "a", "completion": "b"},
                                                         {"prompt": "a", "completion": ["b"]}]), "d.json"),
         lambda c: [str(c.ws / "d.json"), "[1]", "'completion'"]),
    Case("data-malformed-line", _data_run(GOOD_ROWS + '{"prompt": "a", \n'), lambda c: [f"{c.ws / 'd.jsonl'}:9"]),
    Case("data-missing-field", _data_run(GOOD_ROWS + '{"prompt": "a"}\n'),
         lambda c: [f"{c.ws / 'd.jsonl'}:9", "'completion'"]),
    Case("data-empty", _data_run("\n\n"), lambda c: [str(c.ws / "d.jsonl"), "no records"]),
    Case("data-unsupported-type", _data_run(GOOD_ROWS, "d.txt"), lambda c: [str(c.ws / "d.txt")]),
    Case("data-unknown-format", _data_run('{"question": "a", "answer": "b"}\n'),
         lambda c: [f"{c.ws / 'd.jsonl'}:1", "format"]),
    Case("data-corrupt-parquet", _data_run(b"PAR1" + bytes(200), "d.parquet"), lambda c: [str(c.ws / "d.parquet")]),
    Case("data-unknown-builtin", lambda c: _run(c, data={"train": {"builtin": "nosuch"}}),
         lambda c: ["data.train.builtin", "nosuch"]),
    Case("data-bad-eval-file", lambda c: _run(c, data={"eval": {"path": str(c.data("e.jsonl", "{oops\n"))}}),
         lambda c: [f"{c.ws / 'e.jsonl'}:1"]),
    Case("sft-data-dpo-objective", _data_run(GOOD_ROWS, objective={"name": "dpo"}),
         lambda c: ["dpo", "preference", "prompt_completion", str(c.ws / "d.jsonl")]),
    Case("pairs-sft-objective", _data_run(PAIRS), lambda c: ["sft", "preference", str(c.ws / "d.jsonl")]),
    # -- checkpoints, resume, export, eval ------------------------------------------------------------------------
    Case("resume-corrupt-optimizer", _corrupt_ckpt("optimizer.pt", lambda p: p.write_bytes(b"\x00" * 100)),
         lambda c: ["step-000004/optimizer.pt", "step-000002"]),
    Case("resume-truncated-trainable", _corrupt_ckpt("trainable.safetensors", _truncate),
         lambda c: ["step-000004/trainable.safetensors", "step-000002"]),
    Case("resume-bad-state-json", _corrupt_ckpt("state.json", lambda p: p.write_text('{"step": 4,')),
         lambda c: ["step-000004/state.json", "step-000002"]),
    Case("export-truncated-checkpoint",
         lambda c: (_truncate(c.run_copy() / "checkpoints" / "step-000004" / "trainable.safetensors"),
                    ["export", str(c.ws / "runs" / "trained")])[1],
         lambda c: ["step-000004/trainable.safetensors"]),
    Case("export-missing-dir", lambda c: ["export", str(c.ws / "gone")], lambda c: [str(c.ws / "gone")]),
    Case("export-no-checkpoint", lambda c: (shutil.rmtree(c.run_copy() / "checkpoints"),
                                            ["export", str(c.ws / "runs" / "trained")])[1],
         lambda c: [str(c.ws / "runs" / "trained"), "checkpoint"]),
    Case("eval-neither-run-nor-model", lambda c: (c.data("junk/readme.txt", "hi") if (c.ws / "junk").mkdir() is None
                                                  else None, ["eval", str(c.ws / "junk")])[1],
         lambda c: [str(c.ws / "junk")]),
    Case("eval-missing-path", lambda c: ["eval", str(c.ws / "nowhere")], lambda c: [str(c.ws / "nowhere")]),
    Case("eval-label-escapes", _label_escape, lambda c: ["--label", "../../escaped"]),
    Case("report-missing-dir", lambda c: ["report", str(c.ws / "gone"), "-o", str(c.ws / "r.html")],
         lambda c: [str(c.ws / "gone")]),
]


def _listing(root: Path) -> dict[str, str]:
    """Every path under `root` -> its kind and content hash (files), link target (links) or "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run trained for 4 steps with checkpoints at steps 2 and 4 (each case corrupts its own copy)."""
    root = tmp_path_factory.mktemp("trained")
    p = root / "recipe.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, root / "runs", name="trained",
                                                 train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2},
                                                 export={"adapter": False, "merged": False})))
    res = runner.invoke(app, ["train", str(p)])
    assert res.exit_code == 0, res.output
    run = root / "runs" / "trained"
    assert sorted(x.name for x in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    return run


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """CliRunner gives each invocation its own stderr; the CLI's logging handler, set up once per process, would
    write to a closed one (a "Logging error" traceback that is the test's, not tunelab's)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
            root.removeHandler(h)


@pytest.fixture()
def offline(monkeypatch):
    """No machine here reaches the hub: say so up front instead of retrying for half a minute."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clean_line_and_leaves_nothing(case, tiny_model_dir, trained_run, tmp_path, offline):
    ctx = Ctx(tmp_path / "ws", tiny_model_dir, trained_run)
    ctx.ws.mkdir()
    argv = case.setup(ctx)
    before = _listing(ctx.ws)
    res = runner.invoke(app, argv)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        f"an exception escaped: {res.exception!r}\n{res.output}"
    assert "Traceback" not in res.output, res.output
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for s in case.expect(ctx):
        assert s in errors[0], f"{s!r} not named in: {errors[0]}"
    assert _listing(ctx.ws) == before, f"the file system changed:\n{res.output}"
