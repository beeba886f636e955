"""Running a sweep: an Optuna study in a real storage, each trial an ordinary run in a process of its own.

The sweep directory (`<output_dir>/<name>`):
  sweep.yaml              the resolved sweep recipe
  study.db                the Optuna study (SQLite; unless `storage` names another database or a journal file)
  recipes/trial-0003.yaml the recipe each trial runs (`tunelab run` accepts it as it is)
  trials/trial-0003/      the trial's ordinary run directory (metrics.jsonl, eval_*.json, summary.json, ...)
  logs/trial-0003.log     the trial process's output
  summary.json, report.html, best_recipe.yaml (results.py)

A worker asks the study for a trial (Optuna assigns its number atomically in the storage, so two workers, on one
machine or many, never get the same trial), writes its recipe, runs `python -m tunelab.cli run` as a child process
and tells the study the trial's objective values read from its run directory. Trials run in their own processes
so that each one's peak memory (`train.peak_memory_mb`, the resident set's high-water mark) is its own, and a
crashed trial costs only itself. While a trial runs, the worker follows its metrics.jsonl: each logged step's
held-out `eval_loss` (`train.eval_every`) or else training loss is reported to Optuna as the intermediate value
(negated when the objective is maximised, so that the pruner compares it in the study's direction), and a trial
the pruner condemns is stopped by signal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from tunelab.core.io import atomic_write_text
from tunelab.core.process import pid_alive, start_process, stop_process, tunelab_command
from tunelab.recipe import RecipeError, recipe_to_yaml
from tunelab.sweep.objectives import SweepObjective, available_metrics, metric_value
from tunelab.sweep.results import SKIPPED, write_results
from tunelab.sweep.spec import SweepRecipe, read_yaml_mapping, sweep_to_yaml
from tunelab.track.follow import JsonlFollower

log = logging.getLogger("tunelab")

TRIAL_COMMAND = tunelab_command("run")  # + the trial's recipe: an ordinary run


def sweep_dir_of(sr: SweepRecipe) -> Path:
    return Path(sr.output_dir) / sr.name


def storage_url(sr: SweepRecipe, sweep_dir: Path) -> str:
    return sr.storage or f"sqlite:///{sweep_dir.resolve() / 'study.db'}"


def shown_url(url: str) -> str:
    """The storage URL without a password, for summaries and logs."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.split("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def make_storage(url: str):
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # concurrent workers wait for SQLite's write lock instead of failing
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    return optuna.storages.RDBStorage(url, **kwargs)


def make_sampler(sr: SweepRecipe, n_objectives: int, seed: int):
    import optuna

    name = sr.sampler.name
    if name == "auto":
        name = "tpe" if n_objectives == 1 else "nsga2"
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        size = sr.sampler.population_size or max(2, min(50, sr.trials // 2))
        return optuna.samplers.NSGAIISampler(population_size=size, seed=seed)
    startup = sr.sampler.n_startup_trials
    if startup is None:
        startup = max(1, min(10, sr.trials // 3))
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna; they model conditional spaces
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(n_startup_trials=startup, multivariate=True, group=True, seed=seed,
                                          constant_liar=True)


def make_pruner(sr: SweepRecipe, direction: str):
    import optuna

    p = sr.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if p.name == "threshold":  # `upper` is on the loss; the reported value is negated for a maximised objective
        return optuna.pruners.ThresholdPruner(**({"upper": p.upper} if direction == "minimize"
                                                 else {"lower": -float(p.upper)}))
    return optuna.pruners.NopPruner()


def open_study(sr: SweepRecipe, sweep_dir: Path, *, resume: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = sr.parsed_objectives()
    url = storage_url(sr, sweep_dir)
    storage = _retry(lambda: make_storage(url))
    study_name = sr.study_name or sr.name
    exists = study_name in [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if exists and not resume:
        raise RecipeError(f"study {study_name!r} already exists in {shown_url(url)}: --resume continues it (or joins "
                          "it as another worker)")
    seed = sr.sampler.seed
    if resume:  # joining workers must not repeat each other's suggestions: mix the process into the seed
        seed = seed * 1_000_003 + os.getpid()
    directions = [o.direction for o in objectives]
    study = _retry(lambda: optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                               sampler=make_sampler(sr, len(objectives), seed),
                                               pruner=make_pruner(sr, directions[0]), load_if_exists=True))
    if [d.name.lower() for d in study.directions] != directions:
        raise RecipeError(f"study {study_name!r} optimises {[d.name.lower() for d in study.directions]}, not "
                          f"{directions}: the objectives of a study cannot change")
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2
        warnings.simplefilter("ignore")
        study.set_metric_names([o.spec for o in objectives])
    return study


def _retry(make, attempts: int = 6):
    """Workers started at the same moment race to create the storage's tables and the study; the loser of such a
    race gets a database error (a duplicate row, a table that appeared meanwhile) and simply tries again."""
    from sqlalchemy.exc import SQLAlchemyError

    for i in range(attempts):
        try:
            return make()
        except SQLAlchemyError:
            if i == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** i)


def prepare_sweep_dir(sr: SweepRecipe, *, resume: bool) -> Path:
    """Create the sweep directory (never over an existing one unless resuming) and save sweep.yaml; on resume, the
    saved recipe must agree with the given one except for the budget."""
    d = sweep_dir_of(sr)
    saved = d / "sweep.yaml"
    if d.exists() and not resume:
        raise RecipeError(f"sweep directory {d} exists: --resume continues the sweep, or choose another name")
    if saved.is_file():
        old = read_yaml_mapping(saved, "saved sweep recipe")
        new = sr.model_dump(mode="json")
        differ = [k for k in new if k not in ("trials", "storage") and old.get(k) != new[k]]
        if differ:
            raise RecipeError(f"{saved}: the sweep being resumed differs in {', '.join(differ)}; resume with the "
                              f"sweep directory itself (`tunelab sweep {d} --resume`) or choose another name")
    for sub in ("recipes", "trials", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, sweep_to_yaml(sr))
    return d


def _counted(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIPPED))


def recover_orphans(study) -> int:
    """Trials left RUNNING by a dead worker of this machine are failed and their parameters queued again (a new
    trial runs them from the start). Workers of other machines cannot be checked from here: theirs are left."""
    from optuna.trial import TrialState

    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", {})
        if worker.get("host") == host and worker.get("pid") and not pid_alive(int(worker["pid"])):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # no public API fails a trial by id
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            n += 1
    return n


def run_sweep(sr: SweepRecipe, *, resume: bool = False, echo: Callable[[str], None] = print,
              launcher: list[str] | None = None, poll_s: float = 0.5) -> dict[str, Any]:
    """Run trials until the study has `sr.trials` of them; returns the sweep summary (also summary.json).
    `launcher`: the command a trial's recipe path is appended to (default `python -m tunelab.cli run`)."""
    from optuna.trial import TrialState

    sweep_dir = prepare_sweep_dir(sr, resume=resume)
    study = open_study(sr, sweep_dir, resume=resume)
    if (n := recover_orphans(study)):
        echo(f"{n} trial(s) left running by a dead worker: queued again")
    space, objectives = sr.parsed_space(), sr.parsed_objectives()
    echo(f"sweep {sr.name}: {len(objectives)} objective(s) {', '.join(o.spec for o in objectives)}; study in "
         f"{shown_url(storage_url(sr, sweep_dir))}")
    while _counted(study) < sr.trials:
        trial = study.ask()
        if trial.number >= sr.trials:  # another worker asked for the last slot at the same moment
            trial.set_user_attr(SKIPPED, True)
            study.tell(trial, state=TrialState.FAIL)
            break
        state, values = run_trial(sr, sweep_dir, trial, space, objectives, launcher=launcher or TRIAL_COMMAND,
                                  poll_s=poll_s)
        study.tell(trial, values=values if state == TrialState.COMPLETE else None, state=state)
        shown = ", ".join(f"{o.spec} = {v:.4g}" for o, v in zip(objectives, values or []))
        echo(f"trial {trial.number}: {state.name.lower()}{': ' + shown if shown else ''}"
             + (f" ({trial.user_attrs.get('error')})" if state == TrialState.FAIL else ""))
    return write_results(study, sr, sweep_dir, shown_url(storage_url(sr, sweep_dir)))


def _error_tail(log_path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def run_trial(sr: SweepRecipe, sweep_dir: Path, trial, space, objectives: list[SweepObjective], *,
              launcher: list[str], poll_s: float):
    """Sample, write and run one trial; (TrialState, objective values or None)."""
    from optuna.trial import TrialState

    name = f"trial-{trial.number:04d}"
    values = space.sample(trial)
    recipe = sr.trial_recipe(values, name, sweep_dir / "trials")
    run_dir, recipe_path, log_path = sweep_dir / "trials" / name, sweep_dir / "recipes" / f"{name}.yaml", \
        sweep_dir / "logs" / f"{name}.log"
    if run_dir.exists():  # trial numbers are unique in a study; a directory of this name belongs to another one
        trial.set_user_attr("error", f"{run_dir} exists already")
        return TrialState.FAIL, None
    atomic_write_text(recipe_path, recipe_to_yaml(recipe))
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    pruning = sr.pruner.name != "none"
    sign = -1.0 if objectives[0].direction == "maximize" else 1.0
    key = "eval_loss" if recipe.train.eval_every and recipe.data.eval is not None else "loss"
    t0 = time.monotonic()
    proc = start_process([*launcher, str(recipe_path)], log_path)
    follower = JsonlFollower(run_dir / "metrics.jsonl")
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            for rec in follower.new_records():
                if pruning and isinstance(rec.get(key), (int, float)) and isinstance(rec.get("step"), int):
                    trial.report(sign * float(rec[key]), rec["step"])
                    if trial.should_prune():
                        stop_process(proc)
                        trial.set_user_attr("pruned_at_step", rec["step"])
                        return TrialState.PRUNED, None
            if sr.trial_timeout_s and time.monotonic() - t0 > sr.trial_timeout_s:
                stop_process(proc)
                trial.set_user_attr("error", f"stopped after trial_timeout_s = {sr.trial_timeout_s:g} s")
                return TrialState.FAIL, None
    except BaseException:  # the worker itself is interrupted: the trial's process goes with it
        stop_process(proc)
        raise
    if proc.returncode != 0:
        trial.set_user_attr("error", f"exit code {proc.returncode}: {_error_tail(log_path)} (log: {log_path})")
        return TrialState.FAIL, None
    got = [metric_value(run_dir, o.metric) for o in objectives]
    missing = [o.metric for o, v in zip(objectives, got) if v is None]
    if missing:
        trial.set_user_attr("error", f"{run_dir} has no {', '.join(missing)} (it has: "
                                     f"{', '.join(available_metrics(run_dir)) or 'nothing'})")
        return TrialState.FAIL, None
    return TrialState.COMPLETE, got
