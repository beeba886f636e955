"""The stream end to end on the tiny model: R matrix, files, resume after a crash, data errors before training."""

from __future__ import annotations

import json

import pytest
import torch
from continual_helpers import tiny_continual

from tunelab.continual.evaluation import ContinualError
from tunelab.continual.recipe import parse_continual_recipe
from tunelab.continual.stream import run_continual


def _run(d, **kw):
    return run_continual(parse_continual_recipe(d), progress=False, **kw)


def test_stream_writes_r_matrix_and_metrics(tiny_model_dir, tmp_path, general_files):
    text, mc = general_files
    d = tiny_continual(tiny_model_dir, tmp_path / "runs", strategy=[{"name": "replay", "buffer_size": 8}],
                       general={"ppl": [str(text)], "mc": [str(mc)], "n": 3, "ppl_max_chars": 500}, joint=True)
    summary = _run(d)
    run = tmp_path / "runs" / "cl"
    rm = json.loads((run / "continual" / "r_matrix.json").read_text())
    assert rm["tasks"] == ["date_format", "arithmetic"]
    assert len(rm["R"]) == 2 and all(len(r) == 2 for r in rm["R"]) and len(rm["b"]) == 2
    assert len(rm["joint"]) == 2
    # the R entries are the stage evaluations' exact match, and the metrics are computed from them
    ev2 = json.loads((run / "continual" / "stage-02-arithmetic" / "eval.json").read_text())
    assert rm["R"][1] == [ev2["scores"]["date_format"], ev2["scores"]["arithmetic"]]
    assert rm["metrics"]["ACC"] == pytest.approx(sum(rm["R"][1]) / 2)
    assert rm["metrics"]["BWT"] == pytest.approx(rm["R"][1][0] - rm["R"][0][0])
    assert set(rm["general"]["before"]) == {f"ppl:{text.parent.name}/{text.name}", f"mc:{mc.parent.name}/{mc.name}"}
    ret = rm["metrics"]["general_retention"]
    assert ret[f"ppl:{text.parent.name}/{text.name}"]["metric"] == "bits_per_byte"
    # replay: stage 2 trained on its 16 examples + round(16 * 0.2 / 0.8) = 4 replayed ones
    assert summary["stages"][1]["examples"] == 20
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6] and [m["stage"] for m in lines] == [1, 1, 1, 2, 2, 2]
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()
    assert not (run / "continual" / "stage-01-date_format" / "checkpoints").exists()
    assert (run / "continual" / "joint" / "eval.json").is_file()
    assert summary["joint"]["steps"] == 6


def test_resume_after_crash_keeps_earlier_stages(tiny_model_dir, tmp_path, monkeypatch):
    import tunelab.continual.stream as stream

    ref = _run(tiny_continual(tiny_model_dir, tmp_path / "ref", strategy=[{"name": "ewc", "fisher_samples": 4}]))
    ref_rm = json.loads((tmp_path / "ref" / "cl" / "continual" / "r_matrix.json").read_text())

    d = tiny_continual(tiny_model_dir, tmp_path / "runs", strategy=[{"name": "ewc", "fisher_samples": 4}])
    real_train, calls = stream.train, []

    def crashing_train(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            on_step = kw["on_step"]
            kw["on_step"] = lambda step, loss: (on_step(step, loss), (_ for _ in ()).throw(RuntimeError("boom"))
                                                if step == 2 else None)
        return real_train(*a, **kw)

    monkeypatch.setattr(stream, "train", crashing_train)
    with pytest.raises(RuntimeError, match="boom"):
        _run(d)
    run = tmp_path / "runs" / "cl"
    stage1 = run / "continual" / "stage-01-date_format" / "eval.json"
    before_bytes, before_mtime = stage1.read_bytes(), stage1.stat().st_mtime_ns
    state = json.loads((run / "continual" / "state.json").read_text())
    assert state["completed"] == 1 and (run / "continual" / "model-stage-01").is_dir()

    monkeypatch.setattr(stream, "train", real_train)
    summary = run_continual(parse_continual_recipe(json.loads(json.dumps(d))), run_dir=run, resume=True,
                            progress=False)
    assert stage1.read_bytes() == before_bytes and stage1.stat().st_mtime_ns == before_mtime  # untouched
    rm = json.loads((run / "continual" / "r_matrix.json").read_text())
    # the resumed stream equals the uninterrupted one: same R matrix, same final loss of stage 2
    assert rm["R"] == ref_rm["R"]
    assert summary["stages"][1]["final_loss"] == pytest.approx(ref["stages"][1]["final_loss"], rel=1e-5)
    from safetensors.torch import load_file

    got = load_file(str(run / "export" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "cl" / "export" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    # and the EWC penalty was active in the resumed stage (its Fisher came back from model-stage-01)
    stage2 = [json.loads(x) for x in (run / "continual" / "stage-02-arithmetic" / "metrics.jsonl").read_text()
              .splitlines()]
    assert all(m["ewc/penalty"] >= 0 for m in stage2) and stage2[-1]["ewc/penalty"] > 0
    assert [m["stage"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1] * 3 + [2] * 3


@pytest.mark.parametrize("bad", ["missing", "malformed"])
def test_bad_task_data_stops_before_training(tiny_model_dir, tmp_path, bad, monkeypatch):
    import tunelab.continual.stream as stream

    path = tmp_path / "third.jsonl"
    if bad == "malformed":
        path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    stages = [{"builtin": "date_format", "n": 8, "eval_n": 2}, {"builtin": "arithmetic", "n": 8, "eval_n": 2},
              {"name": "mine", "train": {"path": str(path)}, "eval": {"path": str(path)}}]
    trained = []
    monkeypatch.setattr(stream, "train", lambda *a, **k: trained.append(1))
    with pytest.raises(ContinualError, match=r"stage 3 \('mine'\)") as err:
        _run(tiny_continual(tiny_model_dir, tmp_path / "runs", stages=stages))
    assert str(path) in str(err.value) and (":2" in str(err.value) if bad == "malformed" else True)
    assert trained == []
    assert not list((tmp_path / "runs" / "cl" / "continual").glob("stage-*"))


def test_missing_general_file_and_bad_strategy_stop_before_training(tiny_model_dir, tmp_path):
    with pytest.raises(ContinualError, match=r"general\.ppl\.0"):
        _run(tiny_continual(tiny_model_dir, tmp_path / "a", general={"ppl": [str(tmp_path / "nope.txt")]}))
    with pytest.raises(ContinualError, match="olora needs base.method.name: lora"):
        _run(tiny_continual(tiny_model_dir, tmp_path / "b", strategy=[{"name": "olora"}], method={"name": "full"}))


@pytest.mark.parametrize("strategy,method", [
    ({"name": "l2", "weight": 1.0}, None),
    ({"name": "lwf"}, None),
    ({"name": "ilora", "decay": 0.5}, None),
    ({"name": "gere", "losses": {"ce": 1.0, "tm": 100.0}, "n_samples": 4, "max_tokens": 16}, None),
    ({"name": "hft"}, {"name": "hft"}),
    ({"name": "lines", "alpha": 0.5}, {"name": "full"}),
])
def test_each_strategy_runs_a_stream(tiny_model_dir, tmp_path, general_files, strategy, method):
    if strategy["name"] == "gere":
        strategy = {**strategy, "texts": str(general_files[0])}
    d = tiny_continual(tiny_model_dir, tmp_path / "runs", strategy=[strategy], method=method)
    d["base"]["train"]["max_steps"] = 2
    summary = _run(d)
    lines = [json.loads(x) for x in (tmp_path / "runs" / "cl" / "metrics.jsonl").read_text().splitlines()]
    assert len(summary["stages"]) == 2 and len(lines) == 4
    name = strategy["name"]
    if name in ("l2", "lwf"):  # their terms start in the second stage
        key = "l2/penalty" if name == "l2" else "lwf/kl"
        assert key not in lines[0] and lines[-1][key] > 0
    if name == "gere":
        assert all("gere/ce" in m and "gere/tm" in m for m in lines)
    if name == "ilora":  # replay and the consistency term from the second stage (the buffer fills in the first)
        assert "ilora/replay" not in lines[0] and "ilora/replay" in lines[-1] and "ilora/consistency" in lines[-1]


def test_olora_resumes_with_its_adapters(tiny_model_dir, tmp_path, monkeypatch):
    import tunelab.continual.stream as stream

    stages = [{"builtin": t, "n": 8, "eval_n": 2} for t in ("date_format", "arithmetic", "sort_numbers")]

    def mk(out):
        d = tiny_continual(tiny_model_dir, out, strategy=[{"name": "olora"}], stages=stages)
        d["base"]["data"]["max_length"] = 256  # the tiny tokenizer spends many tokens on digits
        return d

    _run(mk(tmp_path / "ref"))
    real_train, calls = stream.train, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_train(*a, **kw)

    monkeypatch.setattr(stream, "train", crash_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        _run(mk(tmp_path / "runs"))
    monkeypatch.setattr(stream, "train", real_train)
    run = tmp_path / "runs" / "cl"
    _run(mk(tmp_path / "runs"), run_dir=run, resume=True)
    from safetensors.torch import load_file

    for sub in ("", "task1", "task2"):  # every task's adapter, as the uninterrupted stream left it
        got = load_file(str(run / "export" / "adapter" / sub / "adapter_model.safetensors"))
        want = load_file(str(tmp_path / "ref" / "cl" / "export" / "adapter" / sub / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
