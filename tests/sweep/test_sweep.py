"""tunelab sweep: the space and its checks, the objectives, the worker loop on a real Optuna storage (trials run by
fake_run.py, a stand-in for `tunelab run` that writes a run directory in a fraction of a second), pruning, failures,
resume, the Pareto front, the best recipe, and two worker processes sharing one study."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tunelab.recipe import RecipeError
from tunelab.sweep.objectives import metric_value, parse_objective
from tunelab.sweep.results import write_best_recipe
from tunelab.sweep.spec import load_sweep, parse_sweep
from tunelab.sweep.study import run_sweep
from tunelab.validate import load_validated_recipe

FAKE = [sys.executable, str(Path(__file__).with_name("fake_run.py"))]


def base(tmp_path: Path, **train) -> dict:
    return {"name": "b", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-model-dir"},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"max_steps": 3, "lr": 0.01, **train}}


def sweep(tmp_path: Path, space: dict, objectives=("eval.exact_match:max",), trials=3, **extra) -> dict:
    return {"name": "sw", "output_dir": str(tmp_path / "sweeps"), "base": base(tmp_path), "space": space,
            "objectives": list(objectives), "trials": trials, **extra}


# -- the space ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space,message", [
    ({"train.lrr": {"low": 1e-4, "high": 1e-3}}, "sweep space 'train.lrr': not a recipe field"),
    ({"train.lr": {"low": 1e-3, "high": 1e-4}}, "needs finite low <= high"),
    ({"train.lr": {"low": 0.0, "high": 1e-3, "log": True}}, "a log range needs low > 0"),
    ({"train.lr": {"choices": []}}, "`choices` takes a non-empty list"),
    ({"train.lr": {"min": 1}}, "give {choices: [...]}, {low, high"),
    ({"method": {"loraa": {}}}, "sweep space 'method.loraa': unknown method 'loraa'"),
    ({"method": {"lora": {"rank": {"choices": [4]}}}}, "'method.lora.rank': not an option of method 'lora'"),
    ({"method.r": {"choices": [4]}}, "method options go under the method they belong to"),
    # every choice is validated by the method's own Config before a trial runs (r must be >= 1)
    ({"method": {"lora": {"r": {"choices": [4, 0]}}}}, "recipe field 'base.method.r'"),
    ({"train.batch_size": {"low": 0, "high": 4}}, "recipe field 'base.train.batch_size'"),
])
def test_space_errors_are_named_before_any_trial(tmp_path, space, message):
    with pytest.raises(RecipeError, match=None) as e:
        parse_sweep(sweep(tmp_path, space))
    assert message in str(e.value)
    assert not (tmp_path / "sweeps").exists()


def test_sweep_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe field 'trails': unknown field"):
        parse_sweep({**sweep(tmp_path, {"train.lr": 0.1}), "trails": 3})
    with pytest.raises(RecipeError, match="pruning needs a single objective"):
        parse_sweep(sweep(tmp_path, {"train.lr": 0.1}, objectives=["eval.exact_match:max", "train.wall_time_s:min"],
                          pruner="median"))
    with pytest.raises(RecipeError, match="write METRIC:max or METRIC:min"):
        parse_sweep(sweep(tmp_path, {"train.lr": 0.1}, objectives=["eval.exact_match"]))
    with pytest.raises(RecipeError, match="train.KEY is one of"):
        parse_objective("train.memory:min")
    with pytest.raises(RecipeError, match="needs general-ability tasks in base.eval.suite"):
        parse_sweep(sweep(tmp_path, {"train.lr": 0.1}, objectives=["forgetting:min"]))
    with pytest.raises(RecipeError, match="an ordinary recipe needs --space"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(base(tmp_path)))
        load_sweep(recipe, objectives=["eval.exact_match:max"])


def test_trial_recipe_conditional_method(tmp_path):
    sr = parse_sweep(sweep(tmp_path, {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                                      "method": {"lora": {"r": {"choices": [2, 8]}}, "ia3": {}}}))
    r = sr.trial_recipe({"train.lr": 0.005, "method": {"name": "lora", "r": 2}}, "t", tmp_path)
    assert r.train.lr == 0.005 and r.method.name == "lora" and r.method_options() == {"r": 2, "alpha": 8}  # base alpha
    r = sr.trial_recipe({"train.lr": 0.005, "method": {"name": "ia3"}}, "t", tmp_path)
    assert r.method.name == "ia3" and r.method_options() == {}  # lora's options do not leak into ia3
    assert r.name == "t" and r.output_dir == str(tmp_path) and r.train.max_steps == 3


def test_ordinary_recipe_with_space_file(tmp_path):
    recipe, space = tmp_path / "r.yaml", tmp_path / "space.yaml"
    recipe.write_text(yaml.safe_dump(base(tmp_path)))
    space.write_text("train.lr: {choices: [0.01, 0.02]}\nmethod: [lora, ia3]\n")
    sr = load_sweep(recipe, ["train.max_steps=5"], space=space, objectives=["eval.exact_match:max"], trials=4)
    assert sr.name == "sweep-b" and sr.trials == 4 and sr.base["train"]["max_steps"] == 5
    assert set(sr.parsed_space().conditional["method"]) == {"lora", "ia3"}


# -- objectives read from run directories ------------------------------------------------------------------------

def test_metric_values_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"peak_memory_mb": 321.0, "wall_time_s": 12.5,
                                                  "after": {"exact_match": 0.5}}))
    (run / "eval_after.json").write_text(json.dumps({"exact_match": 0.75, "eval_loss": 1.5}))
    suite = {"mc:arc.jsonl": {"category": "general", "primary": "acc", "higher_is_better": True},
             "ppl:wiki.raw": {"category": "general", "primary": "bits_per_byte", "higher_is_better": False}}
    for label, acc, bpb in (("before", 0.6, 1.0), ("after", 0.5, 1.2)):
        tasks = {k: {**v, "acc": acc, "bits_per_byte": bpb} for k, v in suite.items()}
        (run / f"eval_suite_{label}.json").write_text(json.dumps({"tasks": tasks}))
    assert metric_value(run, "eval.exact_match") == 0.75  # eval_after.json wins over the summary's copy
    assert metric_value(run, "train.peak_memory_mb") == 321.0
    assert metric_value(run, "suite.mc:arc.jsonl") == 0.5
    assert metric_value(run, "forgetting") == pytest.approx(((0.6 - 0.5) + (1.2 - 1.0)) / 2)  # both got worse
    assert metric_value(run, "eval.reward_accuracy") is None


# -- the worker loop on a real storage ---------------------------------------------------------------------------

def test_single_objective_sweep_best_and_report(tmp_path):
    sr = parse_sweep(sweep(tmp_path, {"train.lr": {"choices": [0.01, 0.03, 0.05]}}, trials=4,
                           sampler={"name": "random", "seed": 1}))
    summary = run_sweep(sr, launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    sweep_dir = tmp_path / "sweeps" / "sw"
    assert summary == json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == {"total": 4, "complete": 4, "pruned": 0, "failed": 0, "running": 0}
    assert (sweep_dir / "study.db").is_file()  # SQLite in the sweep directory by default
    done = summary["all"]
    assert [t["number"] for t in done] == [0, 1, 2, 3]
    for t in done:  # each trial an ordinary run directory, run from the recipe the sweep wrote
        run = Path(t["run_dir"])
        assert run == sweep_dir / "trials" / f"trial-{t['number']:04d}"
        assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"] == t["params"]["train.lr"]
        assert t["values"]["eval.exact_match:max"] == pytest.approx(min(1, 10 * t["params"]["train.lr"]) + 0.01)
    best = max(done, key=lambda t: t["values"]["eval.exact_match:max"])
    assert [t["number"] for t in summary["best"]] == [best["number"]]
    page = (sweep_dir / "report.html").read_text()
    assert "Sweep: Best trial" in page and 'id="front"' in page and 'id="runs"' in page and "trial-0003" in page
    out, chosen = write_best_recipe(sweep_dir)
    assert chosen["number"] == best["number"] and out == sweep_dir / "best_recipe.yaml"
    r = load_validated_recipe(out)  # an ordinary recipe, ready for `tunelab run`
    assert r.name == "sw-best" and r.output_dir == str(tmp_path / "runs") and r.train.lr == best["params"]["train.lr"]


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    sr = parse_sweep(sweep(tmp_path, {"train.lr": {"choices": [0.9, 0.02]}}, trials=3,
                           sampler={"name": "random", "seed": 0}))
    summary = run_sweep(sr, launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    states = {t["params"]["train.lr"]: t["state"] for t in summary["all"]}
    assert states.get(0.9) == "fail" and summary["trials"]["total"] == 3
    failed = next(t for t in summary["all"] if t["state"] == "fail")
    assert "exit code 3" in failed["error"] and "logs/trial-" in failed["error"]


def test_pruning_stops_the_trial_process(tmp_path):
    # loss = 1 / (lr * step): lr 0.01 logs 100 at step 1, over the threshold; 20 steps of 50 ms each
    s = sweep(tmp_path, {"train.lr": {"choices": [0.01]}}, trials=1, pruner={"name": "threshold", "upper": 5.0})
    s["base"]["train"].update(max_steps=20, seed=5)
    summary = run_sweep(parse_sweep(s), launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    (trial,) = summary["all"]
    assert trial["state"] == "pruned" and trial["pruned_at_step"] >= 1
    run = Path(trial["run_dir"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) < 20 and not (run / "summary.json").exists()  # stopped mid-run, never finished


def test_pareto_front_of_two_objectives(tmp_path):
    s = sweep(tmp_path, {"train.lr": {"choices": [0.01, 0.02, 0.04]},
                         "method": {"lora": {"r": {"choices": [2, 8]}}, "ia3": {}}},
              objectives=["eval.exact_match:max", "train.peak_memory_mb:min"], trials=6)
    summary = run_sweep(parse_sweep(s), launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    specs = summary["objectives"]
    done = [(t["values"][specs[0]], t["values"][specs[1]], t["number"]) for t in summary["all"] if t["values"]]

    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    front = {t["number"] for t in summary["best"]}
    assert front == {p[2] for p in done if not any(dominates(q, p) for q in done)}
    page = (tmp_path / "sweeps" / "sw" / "report.html").read_text()
    assert "Sweep: Pareto front" in page and "alt=\"sweep front\"" in page


def test_resume_continues_and_refuses_changes(tmp_path):
    s = sweep(tmp_path, {"train.lr": {"choices": [0.01, 0.02]}}, trials=2)
    run_sweep(parse_sweep(s), launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    with pytest.raises(RecipeError, match="exists: --resume continues the sweep"):
        run_sweep(parse_sweep(s), launcher=FAKE, echo=lambda s: None)
    with pytest.raises(RecipeError, match="differs in space"):
        run_sweep(parse_sweep({**s, "space": {"train.lr": {"choices": [0.03]}}}), resume=True, launcher=FAKE)
    summary = run_sweep(parse_sweep({**s, "trials": 3}), resume=True, launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    assert summary["trials"]["total"] == 3 and [t["number"] for t in summary["all"]] == [0, 1, 2]


WORKER = textwrap.dedent("""
    import sys
    from tunelab.sweep.spec import load_sweep
    from tunelab.sweep.study import run_sweep
    run_sweep(load_sweep(sys.argv[1]), resume=True, launcher=sys.argv[2:], poll_s=0.05)
""")


@pytest.mark.slow  # two worker processes, each importing torch: ~15-40 s
def test_two_workers_on_one_storage_never_run_the_same_trial(tmp_path):
    s = sweep(tmp_path, {"train.lr": {"low": 0.01, "high": 0.1}}, trials=8,
              storage=f"sqlite:///{tmp_path / 'shared.db'}")
    s["base"]["train"].update(max_steps=5, seed=4)  # 5 steps of 40 ms: trials overlap between the workers
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(s))
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), *FAKE], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    import optuna

    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    trials = [t for t in study.trials if not t.user_attrs.get("skipped")]
    assert len(trials) == 8 and sorted(t.number for t in trials) == list(range(8))
    assert all(t.state.name == "COMPLETE" for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 8
    for d in run_dirs:  # run once each: a second run of a trial would have found its directory and failed
        assert len((Path(d) / "metrics.jsonl").read_text().splitlines()) == 5
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"]["pid"], []).append(t.number)
    assert set(by_worker) <= {w.pid for w in workers}
    print(f"trials per worker: {sorted(map(sorted, by_worker.values()))}")


def test_journal_storage_and_a_study_name(tmp_path):
    journal = tmp_path / "shared" / "journal.log"
    s = sweep(tmp_path, {"train.lr": {"choices": [0.01, 0.02]}}, trials=2, storage=f"journal:{journal}",
              study_name="my-study")
    summary = run_sweep(parse_sweep(s), launcher=FAKE, poll_s=0.05, echo=lambda s: None)
    assert summary["trials"]["complete"] == 2 and summary["study_name"] == "my-study"
    assert journal.is_file() and not (tmp_path / "sweeps" / "sw" / "study.db").exists()
    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="my-study", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(journal))))
    assert len(study.trials) == 2
