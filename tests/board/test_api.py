"""The board's API: reading runs, paths kept inside the runs directory, the token and the loopback rules, the launch
form's validation at the field, the queue (one at a time, stop, a crash, resume) and the live event feed. Runs
are started by fake_cli.py (a stand-in for `python -m tunelab.cli` that writes a run directory without training)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from tunelab.board.app import create_app  # noqa: E402
from tunelab.board.events import EventFeed  # noqa: E402
from tunelab.board.runs import Forbidden, inside  # noqa: E402

FAKE = [sys.executable, str(Path(__file__).with_name("fake_cli.py"))]
POST = {"X-Tunelab-Board": "1"}


def make_run(root: Path, name: str, *, finished: bool = True, steps: int = 3) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "recipe.yaml").write_text("method: {name: lora}\nobjective: {name: sft}\ntrain: {max_steps: 3}\n"
                                   "data: {eval: {builtin: date_format}}\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) + "\n"
                                             for s in range(1, steps + 1)))
    if finished:
        (d / "summary.json").write_text(json.dumps({"method": "lora", "peak_memory_mb": 300.0, "tokens_per_s": 50.0,
                                                    "before": {"exact_match": 0.1}, "after": {"exact_match": 0.6}}))
    return d


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "runs"
    make_run(r, "alpha")
    make_run(r, "beta", finished=False)
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (r / "link-out").symlink_to(tmp_path)  # a link inside the root pointing out of it
    (r / ".board").mkdir()
    (r / ".board" / "hidden.json").write_text('{"x": 1}')
    return r


@pytest.fixture()
def client(root):
    app = create_app(root, command=FAKE)
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c
        app.state.board.queue.shutdown(stop_runs=True)


def wait_for(fn, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := fn()):
            return v
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_runs_list_and_detail(client):
    snap = client.get("/api/runs").json()
    rows = {r["id"]: r for r in snap["runs"]}
    assert set(rows) == {"alpha", "beta"}  # the link out of the root is not followed
    assert rows["alpha"]["status"] == "finished" and rows["beta"]["status"] == "incomplete"
    assert rows["alpha"]["method"] == "lora" and rows["alpha"]["score_after"] == 0.6
    assert rows["alpha"]["peak_memory_mb"] == 300.0 and rows["beta"]["step"] == 3
    d = client.get("/api/run/alpha").json()
    assert [m["step"] for m in d["metrics"]] == [1, 2, 3] and "max_steps: 3" in d["recipe_yaml"]
    assert client.get("/api/run/gamma").status_code == 404


@pytest.mark.parametrize("url", [
    "/api/files/../secret.txt", "/api/files/%2e%2e/secret.txt", "/api/files/alpha/%2e%2e/%2e%2e/secret.txt",
    "/api/files/%2Fetc%2Fpasswd", "/api/files//etc/passwd", "/api/files/link-out/secret.txt",
    "/api/files/.board/hidden.json", "/api/files/alpha%2F..%2F..%2Fsecret.txt", "/api/run/..%2Fsecret.txt",
    "/api/run/link-out", "/api/compare?run=../secret.txt", "/api/compare?run=link-out",
    "/api/events?run=..%2F..", "/api/log/..%2Fsecret.txt",
])
def test_no_request_reads_outside_the_runs_directory(client, url):
    r = client.get(url)
    assert r.status_code in (403, 404), (url, r.status_code)
    assert "TOP SECRET" not in r.text


@pytest.mark.parametrize("url", ["/api/stop/..%2Fsecret.txt", "/api/resume/..%2F..%2Ftmp", "/api/resume/link-out"])
def test_no_request_writes_outside_the_runs_directory(client, url, root):
    r = client.post(url, headers=POST)
    assert r.status_code in (403, 404), (url, r.status_code)
    assert client.get("/api/runs").json()["jobs"] == []


def test_inside(tmp_path):
    assert inside(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    for bad in ("", "..", "a/../..", "/etc", ".board/x", "a/.hidden", "a\x00b"):
        with pytest.raises(Forbidden):
            inside(tmp_path, bad)


def test_files_inside_are_served(client):
    r = client.get("/api/files/alpha/summary.json")
    assert r.status_code == 200 and r.json()["method"] == "lora"
    assert client.get("/api/files/alpha/checkpoints/x.safetensors").status_code == 404  # not a readable kind


def test_token_required_and_moved_to_a_cookie(root):
    token = "t" * 24
    with TestClient(create_app(root, token=token, command=FAKE), base_url="http://10.1.2.3:8765") as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong-token-wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        r = c.get(f"/?token={token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/" and "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/runs").status_code == 200  # the cookie now


def test_loopback_only_without_a_token_and_csrf_header(root):
    with TestClient(create_app(root, command=FAKE), base_url="http://evil.example:8765") as c:
        r = c.get("/api/runs")  # a page whose DNS name was rebound to 127.0.0.1
        assert r.status_code == 403 and "loopback only" in r.text
    with TestClient(create_app(root, command=FAKE), base_url="http://localhost:8765") as c:
        assert c.get("/api/runs").status_code == 200
        r = c.post("/api/validate", json={"overrides": []})  # no X-Tunelab-Board: a cross-site form could send it
        assert r.status_code == 403


def test_validation_errors_name_their_field(client):
    r = client.post("/api/validate", json={"overrides": ["train.lr=abc", "method.r=0", "train.bogus=1"]},
                    headers=POST).json()
    assert not r["ok"]
    fields = {e["field"] for e in r["errors"]}
    assert "train.lr" in fields and "train.bogus" in fields
    r = client.post("/api/validate", json={"overrides": ["method.name=lora", "method.r=0"]}, headers=POST).json()
    assert [e["field"] for e in r["errors"]] == ["method.r"]  # checked by LoRA's own Config
    r = client.post("/api/validate", json={"yaml": "train: [unclosed"}, headers=POST).json()
    assert not r["ok"] and "not valid YAML" in r["errors"][0]["message"]
    r = client.post("/api/validate", json={"overrides": ["train.max_steps=5", "method.name=ia3", "data.train.n=64"]},
                    headers=POST).json()
    assert r["ok"] and "max_steps: 5" in r["yaml"] and r["values"]["method"]["name"] == "ia3"
    assert r["values"]["data"]["train"] == {**r["values"]["data"]["train"], "builtin": "date_format", "n": 64}


def test_schema_from_the_recipe_and_the_registries(client):
    s = client.get("/api/schema").json()
    fields = {f["path"]: f for f in s["fields"]}
    assert fields["train.lr"]["widget"] == "number" and fields["train.scheduler"]["widget"] == "select"
    assert "cosine" in fields["train.scheduler"]["choices"] and fields["eval.before"]["widget"] == "checkbox"
    assert fields["train.max_steps"]["nullable"] and fields["train"]["section"]
    assert fields["export.gguf"]["widget"] == "yaml"  # list[Literal[...]]: a list, not one of the literals
    lora = {o["path"]: o for o in s["methods"]["lora"]["options"]}
    assert lora["r"]["widget"] == "number" and lora["r"]["value"] == 16 and "arxiv" in s["methods"]["lora"]["paper"]
    assert "dpo" in s["objectives"] and "quickstart" in s["recipes"]
    assert "continual_lora" not in s["recipes"]  # not a recipe `tunelab run` takes


def launch(client, tmp_path, **train):
    recipe = {"name": "job", "output_dir": str(tmp_path / "elsewhere"), "train": {"max_steps": 3, "lr": 0.01,
                                                                                  "seed": 0, **train}}
    return client.post("/api/launch", json={"yaml": yaml.safe_dump(recipe)}, headers=POST)


def test_launch_refuses_before_any_process(client, root, tmp_path):
    r = client.post("/api/launch", json={"yaml": "name: job\ntrain: {lr: -1}\n"}, headers=POST)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "train.lr"
    r = client.post("/api/launch", json={"yaml": "name: ../escape\n"}, headers=POST)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "name"
    assert client.get("/api/runs").json()["jobs"] == [] and not (root.parent / "escape").exists()


def test_launch_runs_under_the_root_one_at_a_time(client, root, tmp_path):
    first = launch(client, tmp_path, max_steps=30, seed=5).json()  # 30 steps of 50 ms
    second = launch(client, tmp_path).json()
    assert first["run"] == "job" and second["run"] == "job-2"  # never over an existing run
    wait_for(lambda: client.get("/api/run/job").json()["status"] == "running")
    assert client.get("/api/run/job-2").json()["status"] == "queued"  # one at a time by default
    jobs = client.get("/api/runs").json()["jobs"]
    assert jobs[0]["pid"] and os.getsid(jobs[0]["pid"]) != os.getsid(0)  # its own session: outlives the page
    wait_for(lambda: client.get("/api/run/job-2").json()["status"] == "finished")
    assert (root / "job" / "summary.json").is_file() and not (tmp_path / "elsewhere").exists()
    assert "run directory:" in client.get("/api/log/job").text


def test_stop_crash_and_resume(client, root, tmp_path):
    launch(client, tmp_path, max_steps=400, seed=5)  # 20 s unless stopped
    wait_for(lambda: client.get("/api/run/job").json().get("step") or None)
    pid = client.get("/api/runs").json()["jobs"][0]["pid"]
    assert client.post("/api/stop/job", headers=POST).json()["ok"]
    wait_for(lambda: client.get("/api/run/job").json()["status"] == "stopped", timeout=30)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    steps = client.get("/api/run/job").json()["step"]
    assert steps < 400 and client.post("/api/stop/job", headers=POST).status_code == 409

    launch(client, tmp_path, lr=0.9)  # crashes
    wait_for(lambda: client.get("/api/run/job-2").json()["status"] == "failed")
    assert client.get("/api/runs").status_code == 200  # the board carries on

    path = root / "job" / "recipe.yaml"
    path.write_text(path.read_text().replace("max_steps: 400", "max_steps: " + str(steps + 2)))
    r = client.post("/api/resume/job", headers=POST).json()
    assert r["ok"] and r["job"]["kind"] == "resume"
    wait_for(lambda: client.get("/api/run/job").json()["status"] == "finished")
    assert client.get("/api/run/job").json()["step"] == steps + 2


def test_compare_is_tunelab_report(client):
    page = client.get("/api/compare?run=alpha&run=beta").text
    assert '<table id="runs"' in page and ">alpha<" in page and ">beta<" in page and "Loss curves" in page


def test_event_feed(tmp_path):
    run = make_run(tmp_path, "r", finished=False, steps=2)
    state = {"n": 0}
    feed = EventFeed(lambda: {"runs": state["n"]}, run, lambda: "running", after=2)
    first = feed.poll()
    assert [c.split("\n")[0] for c in first] == ["event: runs", "event: status"]  # no metrics: the page has 2
    assert feed.poll() == []
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')  # a torn line waits
    (chunk,) = feed.poll()
    assert chunk.startswith("event: metrics") and json.loads(chunk.split("data: ")[1]) == [{"step": 3, "loss": 1.0}]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('ss": 0.5}\n')
    state["n"] = 1
    chunks = feed.poll()
    assert chunks[0].startswith("event: runs") and '"step": 4' in chunks[1]


def test_running_from_the_run_lock_and_stopping_a_cli_run(client, root):
    """A run started elsewhere (here: a process holding the run directory's lock, as `tunelab run` does) shows as
    running while its process lives, and Stop signals that process."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tunelab.core.rundir import lock_run_dir\n"
                               f"lock_run_dir({str(root / 'beta')!r})\nprint('locked', flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert client.get("/api/run/beta").json()["status"] == "running"
        assert client.get("/api/run/beta").json()["holder"]["pid"] == holder.pid
        assert client.post("/api/stop/beta", headers=POST).json() == {"ok": True, "status": "stopping"}
        assert holder.wait(timeout=30) != 0
        wait_for(lambda: client.get("/api/run/beta").json()["status"] == "incomplete")  # the dead pid holds nothing
    finally:
        holder.kill()
        holder.wait()
