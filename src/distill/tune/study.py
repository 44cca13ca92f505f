"""The Optuna study: samplers, pruners, SQLite storage, resumption of interrupted trials."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from distill.checkpoint import atomic_write_text
from distill.errors import ConfigError, DistillError
from distill.run.config import RecipeConfig
from distill.tune.config import TuneConfig, TuneRecipe
from distill.tune.report import write_outputs
from distill.tune.trials import FileLock, dead_owner, make_objective, prepare_teachers

# --------------------------------------------------------------------------- the study


def _sampler(cfg: TuneConfig, multi: bool, worker: int = 0):
    """The sampler; `worker` (0 for the first process on a study folder) shifts the seed so that
    concurrent workers do not draw the same values."""
    import optuna

    seed = None if cfg.seed is None else cfg.seed + 7_919 * worker
    kind = cfg.sampler if cfg.sampler != "auto" else ("nsga2" if multi else "tpe")
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(cfg.trials // 3, 50)))
    return optuna.samplers.RandomSampler(seed=seed)


def _worker_index(out: Path) -> int:
    """How many processes opened the study in `out` before this one (a counter under a file lock)."""
    path = out / "workers.json"
    with FileLock(out / ".workers.lock"):
        k = json.loads(path.read_text())["opened"] if path.exists() else 0
        atomic_write_text(path, json.dumps({"opened": k + 1}))
    return k


def _pruner(cfg: TuneRecipe):
    import optuna

    t = cfg.tune
    if t.pruner == "none" or len(t.objectives) > 1:
        return optuna.pruners.NopPruner()
    if t.pruner == "hyperband":
        epochs = cfg.search.get("trainer.epochs")
        max_epochs = max(cfg.trainer.epochs, int(epochs.high) if epochs and epochs.high else 0)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    return optuna.pruners.MedianPruner(
        n_startup_trials=t.pruner_startup_trials, n_warmup_steps=t.pruner_warmup_epochs
    )


GRACE_ENV = "DISTILL_TUNE_GRACE_S"


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds. A running trial records a heartbeat every
    interval; one whose heartbeat is older than the grace period (its process died) is taken for
    interrupted and queued again. Default 30 s and 120 s; the environment variable
    DISTILL_TUNE_GRACE_S sets the grace period (the interval becomes a quarter of it, at least 1 s),
    e.g. to a few seconds in tests that kill a study and run it again at once."""
    raw = os.environ.get(GRACE_ENV)
    if raw is None:
        return 30, 120
    try:
        grace = int(raw)
    except ValueError:
        grace = 0
    if grace < 2:
        raise DistillError(f"{GRACE_ENV}={raw!r}: give a whole number of seconds, at least 2")
    return max(1, grace // 4), grace


def open_study(cfg: TuneRecipe, out: Path, study_name: str | None = None, storage: str | None = None):
    """Creates the study, or loads it when it exists (same name, same storage)."""
    import optuna

    url = storage or cfg.tune.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or cfg.tune.study_name or cfg.name
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        # several workers on one SQLite file: wait for the write lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beat, grace = heartbeat_settings()
        storage_obj = optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=grace, **kwargs)
    directions = [o.direction for o in cfg.tune.objectives]
    multi = len(directions) > 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(
                study_name=name,
                storage=storage_obj,
                sampler=_sampler(cfg.tune, multi, _worker_index(out)),
                pruner=_pruner(cfg),
                directions=directions,
                load_if_exists=True,
            )
    except ValueError as e:  # e.g. a loaded study with other directions
        raise ConfigError(f"study '{name}' in {url}: {e}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study '{name}' in {url} optimises {[d.name.lower() for d in study.directions]}, "
            f"not {directions}; use another study name or --out"
        )
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


MAX_ATTEMPTS = 3  # a trial's values are run at most this often (the first try and two resumptions)


def _requeue_interrupted(study) -> list[int]:
    """Trials cut short by a crash, a kill or Ctrl-C (failed without an error of their own, running
    with a process of this machine that no longer exists, or running with a stale heartbeat: the
    grace period, for trials of other machines on shared storage) are queued again with the same
    values; they resume in the folder of their first try. A resumption that is cut short too is queued again, up to
    `MAX_ATTEMPTS` tries in all (so a trial that kills its process every time does not loop)."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if dead_owner(t.user_attrs):  # killed on this machine: no need to wait for the grace period
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    latest: dict[int, int] = {}  # first try -> the number of its latest try
    tries: dict[int, int] = {}
    for t in trials:
        first = t.user_attrs.get("resume_of", t.number)
        latest[first] = max(latest.get(first, -1), t.number)
        tries[first] = tries.get(first, 0) + 1
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or "error" in t.user_attrs:
            continue
        first = t.user_attrs.get("resume_of", t.number)
        if latest[first] != t.number or tries[first] >= MAX_ATTEMPTS:
            continue
        study.enqueue_trial(t.params, user_attrs={"resume_of": first})
        queued.append(t.number)
    return queued


def _check_same_recipe(cfg: TuneRecipe, out: Path) -> None:
    from distill.run.rundir import _first_difference

    path = out / "tune_recipe.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"tune": {"trials"}}), sort_keys=False)
    if path.exists():
        diff = _first_difference(yaml.safe_load(path.read_text()), yaml.safe_load(text))
        if diff:
            raise ConfigError(
                f"{out} holds a study of a different recipe (differs at {diff}); "
                "use another --out to start a new study"
            )
    else:
        atomic_write_text(path, text)


def run_tune(
    cfg: TuneRecipe,
    out: str | Path,
    trials: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Runs (or continues) the study until it holds `trials` finished trials; writes the outputs."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise DistillError("distill tune needs Optuna: pip install 'distill[tune]'")
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(cfg, out)
    target = trials or cfg.tune.trials
    t0 = time.perf_counter()
    base = RecipeConfig.model_validate(cfg.base_data())
    teacher_paths = prepare_teachers(base, out)
    study = open_study(cfg, out, study_name, storage)
    queued = _requeue_interrupted(study)
    done = _finished(study)
    log(
        f"study '{study.study_name}': {done} finished trial(s) so far, target {target}"
        + (f"; resuming interrupted trial(s) {queued}" if queued else "")
    )
    if done < target:
        study.optimize(
            make_objective(cfg, out, teacher_paths),
            n_trials=target - done,
            callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))],
            gc_after_trial=False,
        )
    summary = write_outputs(cfg, study, out, base)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
