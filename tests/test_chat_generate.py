"""`tunelab chat` (the conversation loop, streaming, /reset, /system) and `tunelab generate` (JSONL in and out)."""

import json

from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.commands.chat import chat_loop

runner = CliRunner()


class _Recorder:
    """A backend that records the conversations it is asked to continue and streams a fixed reply."""

    def __init__(self):
        self.seen = []

    def reply(self, messages, echo):
        self.seen.append([dict(m) for m in messages])
        for piece in ("fine", ", thanks"):
            echo(piece)
        return "fine, thanks"


def test_chat_loop_history_reset_and_system():
    backend, out = _Recorder(), []
    lines = ["hello\n", "again\n", "/system Be brief.\n", "hi\n", "/reset\n", "bye\n", "/nope\n", "/exit\n", "x\n"]
    final = chat_loop(backend, lines, out.append)
    assert [len(m) for m in backend.seen] == [1, 3, 2, 2]  # history grows; /system and /reset start over
    assert backend.seen[1][1] == {"role": "assistant", "content": "fine, thanks"}
    assert backend.seen[2][0] == {"role": "system", "content": "Be brief."}
    assert backend.seen[3][0]["role"] == "system"  # /reset keeps the system prompt
    assert "".join(out).count("assistant> fine, thanks") == 4 and "unknown command /nope" in "".join(out)
    assert final[-1]["content"] == "fine, thanks" and final[-2]["content"] == "bye"  # "x" after /exit unread


def test_chat_command_streams_from_a_model(tiny_model_dir):
    res = runner.invoke(app, ["chat", str(tiny_model_dir), "--max-new-tokens", "5", "--system", "S"],
                        input="What is 1 + 1?\n/reset\nWhat is 2 + 2?\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("assistant> ") == 2 and "(conversation reset)" in res.output


def test_generate_writes_jsonl(tiny_model_dir, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "What is 1 + 1?", "id": 7}) + "\n\n" +
                   json.dumps({"messages": [{"role": "user", "content": "Rewrite the date"}]}) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    res = runner.invoke(app, ["generate", str(tiny_model_dir), "--input", str(src), "-o", str(out),
                              "--max-new-tokens", "4", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == 7 and all(isinstance(r["completion"], str) for r in rows)
    assert all(isinstance(r["stopped"], bool) for r in rows)
    # sampling with a seed is reproducible
    again = tmp_path / "again.jsonl"
    args = ["--max-new-tokens", "4", "--temperature", "1.0", "--seed", "3"]
    runner.invoke(app, ["generate", str(tiny_model_dir), "--input", str(src), "-o", str(out), *args])
    runner.invoke(app, ["generate", str(tiny_model_dir), "--input", str(src), "-o", str(again), *args])
    assert out.read_text() == again.read_text()


def test_generate_names_the_bad_line(tiny_model_dir, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    res = runner.invoke(app, ["generate", str(tiny_model_dir), "--input", str(src), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "p.jsonl:2" in res.output
