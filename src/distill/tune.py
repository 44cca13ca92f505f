"""Hyperparameter search over a recipe with Optuna: `distill tune RECIPE.yaml --trials N`.

A tune recipe is a normal recipe plus two blocks:

```yaml
search:                                   # dotted recipe keys -> how to sample them
  trainer.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  objective.terms.kd.init_args.temperature: {type: float, low: 1, high: 8}
  student.init_args.hidden: {type: categorical, choices: [[64], [128], [256, 128]]}
tune:
  objectives: [{metric: accuracy, direction: maximize}]
  pruner: median
```

Each trial is a normal `distill.pipeline.run_recipe` run in `<out>/trials/<number>/` (config.yaml,
metrics.jsonl, checkpoints, summary.json), distilling from one teacher trained once and cached in
`<out>/teacher.safetensors`. The study lives in SQLite (`<out>/study.db`), so a second invocation
continues it (and resumes trials cut short by a crash from their last checkpoint) and several
processes can share it. Objectives are read from the trial's last validation evaluation
(`accuracy`, `nll`, `agreement`) or, for costs, from its measured row (`params`, `size_mb`,
`latency_ms_b1`, ...); the test split is only reported, never optimised.

Optuna is an optional extra: it is imported inside the functions that need it.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from distill.checkpoint import atomic_write, atomic_write_text
from distill.config import RecipeConfig, Strict, apply_overrides, format_validation_error, load_yaml
from distill.errors import ConfigError, DistillError, TrainingDiverged

# --------------------------------------------------------------------------- configuration


class SearchParam(Strict):
    """How one recipe key is sampled.

    `float`/`int`: uniform in [low, high] (log-uniform with `log: true`; on a grid with `step`).
    `categorical`: one of `choices`; choices may be lists or mappings (e.g. a whole
    `objective.terms` block), shown in tables by `labels` when given.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    labels: list[str] | None = None


class TuneObjective(Strict):
    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"


class TuneConfig(Strict):
    """The study: its name and storage, what it optimises and how it samples and prunes."""

    study_name: str | None = Field(None, description="default: the recipe's name")
    storage: str | None = Field(None, description="an Optuna storage URL; default sqlite:///<out>/study.db")
    trials: int = Field(20, gt=0, description="finished (complete + pruned) trials to reach")
    objectives: list[TuneObjective] = Field(default_factory=lambda: [TuneObjective()], min_length=1)
    sampler: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto: tpe for one objective, nsga2 for several"
    )
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(5, ge=0, description="median: trials finished before pruning")
    pruner_warmup_epochs: int = Field(1, ge=0, description="median: epochs before a trial may be pruned")
    seed: int | None = Field(0, description="the sampler's seed")
    baselines: list[Literal["scratch"]] = Field(
        default_factory=list, description="per-trial baselines (none by default: trials stay short)"
    )


class TuneRecipe(RecipeConfig):
    """A recipe plus the `search:` space and the `tune:` study settings."""

    search: dict[str, SearchParam] = Field(default_factory=dict)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def base_data(self) -> dict[str, Any]:
        """The recipe without `search`/`tune`, as plain data (every key, defaults filled)."""
        return self.model_dump(mode="json", exclude={"search", "tune"})


def parse_tune_recipe(data: dict[str, Any], source: str = "recipe") -> TuneRecipe:
    try:
        cfg = TuneRecipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "search":
            near = difflib.get_close_matches(loc[2], list(SearchParam.model_fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            allowed = ", ".join(SearchParam.model_fields)
            raise ConfigError(
                f"{source}: search.{loc[1]}: unknown field '{loc[2]}'{hint}; one of {allowed}"
            ) from None
        raise ConfigError(f"{source}: {format_validation_error(e, TuneRecipe)}") from None
    validate_search(cfg, source)
    return cfg


def load_tune_recipe(path: str | Path, overrides: list[str] | None = None) -> TuneRecipe:
    return parse_tune_recipe(apply_overrides(load_yaml(path), overrides or []), source=str(path))


# --------------------------------------------------------------------------- the search space

_MISSING = object()
# Free-form mappings: any key below them is accepted (a loss's or model's own keyword arguments).
_FREE = ("init_args", "schedules")


def _get(data: Any, parts: list[str]) -> Any:
    for p in parts:
        if not isinstance(data, dict) or p not in data:
            return _MISSING
        data = data[p]
    return data


def _set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            keys.append(key)
            keys.extend(_dotted_keys(v, key))
    return keys


def _key_exists(base: dict[str, Any], key: str) -> bool:
    parts = key.split(".")
    if _get(base, parts) is not _MISSING:
        return True
    # under a free-form mapping, a new key is fine as long as the mapping itself exists
    return any(p in _FREE and _get(base, parts[: i + 1]) is not _MISSING for i, p in enumerate(parts[:-1]))


def _structural_keys(cfg: TuneRecipe) -> set[str]:
    """Keys that a categorical choice of a mapping (e.g. `objective.terms`) may create."""
    keys: set[str] = set()
    for key, p in cfg.search.items():
        if p.type == "categorical":
            for c in p.choices or []:
                keys.update(f"{key}.{k}" for k in _dotted_keys(c))
    return keys


def validate_search(cfg: TuneRecipe, source: str = "recipe") -> None:
    """Checks the search space before any trial: every key exists in the recipe, every range is
    non-empty, and the recipe still validates at each end of each range and with each choice."""
    where = f"{source}: search"
    if not cfg.search:
        raise ConfigError(f"{where}: is empty; declare at least one key to tune, e.g. trainer.optimizer.lr")
    base = cfg.base_data()
    structural = _structural_keys(cfg)
    for key, p in cfg.search.items():
        name = f"{where}.{key}"
        if key.split(".")[0] == "teacher":
            raise ConfigError(
                f"{name}: the teacher is trained once and shared by all trials; tune student-side keys"
            )
        if key in ("seed", "name"):
            raise ConfigError(f"{name}: '{key}' is not a hyperparameter; remove it from search")
        if not _key_exists(base, key) and key not in structural:
            near = difflib.get_close_matches(key, _dotted_keys(base), n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{name}: unknown recipe key{hint}")
        if p.type == "categorical":
            if not p.choices:
                raise ConfigError(f"{name}: categorical needs a non-empty 'choices' list")
            if p.low is not None or p.high is not None or p.log or p.step is not None:
                raise ConfigError(f"{name}: categorical takes 'choices', not low/high/log/step")
            if p.labels is not None and len(p.labels) != len(p.choices):
                raise ConfigError(
                    f"{name}: {len(p.labels)} labels for {len(p.choices)} choices; give one label per choice"
                )
            probes = list(p.choices)
        else:
            if p.choices is not None:
                raise ConfigError(f"{name}: a {p.type} range takes low/high, not choices")
            if p.low is None or p.high is None:
                raise ConfigError(f"{name}: a {p.type} range needs both 'low' and 'high'")
            if p.low >= p.high:
                raise ConfigError(f"{name}: empty range (low {p.low:g} >= high {p.high:g}); give low < high")
            if p.log and p.low <= 0:
                raise ConfigError(f"{name}: log scale needs low > 0 (got {p.low:g})")
            if p.log and p.step is not None:
                raise ConfigError(f"{name}: give either log: true or a step, not both")
            if p.step is not None and p.step <= 0:
                raise ConfigError(f"{name}: step must be > 0 (got {p.step:g})")
            if p.type == "int":
                for k in ("low", "high", "step"):
                    v = getattr(p, k)
                    if v is not None and v != int(v):
                        raise ConfigError(f"{name}: an int range needs whole numbers ({k}={v:g})")
                probes = [int(p.low), int(p.high)]
            else:
                probes = [float(p.low), float(p.high)]
        if key in structural or _get(base, key.split(".")) is _MISSING:
            continue  # created by another choice, or a free init_arg: checked when built
        for value in probes:
            data = json.loads(json.dumps(base))
            _set(data, key.split("."), value)
            try:
                RecipeConfig.model_validate(data)
            except ValidationError as e:
                msg = format_validation_error(e, RecipeConfig)
                raise ConfigError(f"{name}: the value {value!r} does not fit the recipe: {msg}") from None


def _label(p: SearchParam, i: int) -> str:
    if p.labels:
        return p.labels[i]
    c = p.choices[i]
    return c if isinstance(c, str) else json.dumps(c, separators=(",", ":"))


def _primitive(p: SearchParam) -> bool:
    return all(c is None or isinstance(c, bool | int | float | str) for c in p.choices or [])


def suggest(trial: Any, cfg: TuneRecipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Samples the space for `trial` (define-by-run): returns the trial's recipe data and the
    sampled values by key. Keys whose parent a structural choice removed are not sampled."""
    data = cfg.base_data()
    values: dict[str, Any] = {}
    # shorter keys first, so that `objective.terms` is chosen before `objective.terms.kd.weight`
    for key in sorted(cfg.search, key=lambda k: k.count(".")):
        p = cfg.search[key]
        parts = key.split(".")
        parent = _get(data, parts[:-1]) if len(parts) > 1 else data
        if parent is _MISSING or not isinstance(parent, dict):
            continue
        if p.type == "float":
            v: Any = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            v = trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif _primitive(p):
            v = trial.suggest_categorical(key, p.choices)
        else:
            labels = [_label(p, i) for i in range(len(p.choices))]
            chosen = trial.suggest_categorical(key, labels)
            v = json.loads(json.dumps(p.choices[labels.index(chosen)]))
        _set(data, parts, v)
        values[key] = v
    return data, values


# --------------------------------------------------------------------------- the teacher, once


class _FileLock:
    """A blocking exclusive lock, so that several workers train the shared teacher only once."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def prepare_teacher(cfg: RecipeConfig, out: Path) -> tuple[str, dict[str, Any] | None]:
    """Returns the path of the teacher's weights that every trial loads, training the teacher once
    (in `<out>/teacher/`, resumable) when the recipe gives no checkpoint; and its measured row."""
    if cfg.teacher.checkpoint:
        return cfg.teacher.checkpoint, None
    if cfg.teacher.train is None:
        raise ConfigError("teacher: give a checkpoint to load or a train: section to train it first")
    from distill.checkpoint import load_weights, save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.pipeline import build_adapter, measure, scratch_objective, train_stage
    from distill.rundir import RunDir
    from distill.trainer import seed_everything

    path = out / "teacher.safetensors"
    row_path = out / "teacher.json"
    with _FileLock(out / ".teacher.lock"):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        seed_everything(cfg.seed)
        model = build_model(cfg.teacher.spec(), data)
        if path.exists() and row_path.exists():
            return str(path.resolve()), json.loads(row_path.read_text())
        adapter = build_adapter(cfg.teacher.adapter)
        teacher_cfg = cfg.model_copy(update={"baselines": []})
        with RunDir(out / "teacher", teacher_cfg.to_yaml(), resume=True):
            train_stage(
                "teacher",
                model,
                scratch_objective(cfg),
                data,
                cfg,
                cfg.teacher.train,
                out / "teacher",
                adapter=adapter,
            )
        save_weights(path, model.state_dict(), {"stage": "teacher"})
        load_weights(model, path)
        row = measure("teacher", model, data, cfg, None, adapter=adapter)
        atomic_write_text(row_path, json.dumps(row, indent=2))
        return str(path.resolve()), row


# --------------------------------------------------------------------------- trials


class _TrialReporter:
    """Trainer callback: remembers the distilled student's last validation record and reports its
    first objective to Optuna each evaluation, raising `optuna.TrialPruned` when the pruner says so."""

    def __init__(self, trial: Any, metric: str, prune: bool, stage: str = "student_kd"):
        self.trial, self.metric, self.prune, self.stage = trial, metric, prune, stage
        self.last: dict[str, Any] = {}

    def on_evaluate(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.stage != self.stage:
            return
        self.last = dict(metrics)
        value = metrics.get(self.metric)
        if not self.prune or value is None:
            return
        import optuna

        epoch = int(metrics.get("epoch", trainer.epoch))
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric} {float(value):.4f}")


def _objective_values(cfg: TuneRecipe, val: dict[str, Any], row: dict[str, Any]) -> list[float]:
    values = []
    for o in cfg.tune.objectives:
        v = val.get(o.metric, row.get(o.metric))
        if not isinstance(v, int | float) or isinstance(v, bool):
            have = sorted(
                {
                    k
                    for k, x in {**row, **val}.items()
                    if isinstance(x, int | float) and k not in ("step", "epoch")
                }
            )
            raise ConfigError(
                f"tune.objectives: metric '{o.metric}' was not measured; one of {', '.join(have)}"
            )
        values.append(float(v))
    return values


def make_objective(cfg: TuneRecipe, out: Path, teacher_path: str):
    """The function Optuna calls per trial: samples, runs the recipe in its own folder, scores it."""
    import optuna

    from distill.config import parse_recipe
    from distill.pipeline import run_recipe
    from distill.trainer import use_callbacks

    multi = len(cfg.tune.objectives) > 1
    prune = not multi and cfg.tune.pruner != "none"

    def objective(trial: optuna.Trial):
        data, values = suggest(trial, cfg)
        data["teacher"]["checkpoint"] = teacher_path
        data["teacher"]["train"] = None
        data["baselines"] = list(cfg.tune.baselines)
        folder = trial.user_attrs.get("resume_of", trial.number)
        trial_cfg = parse_recipe(data, source=f"trial {trial.number} ({_short(values)})")
        run_dir = out / "trials" / str(folder)
        trial.set_user_attr("run_dir", str(run_dir))
        reporter = _TrialReporter(trial, cfg.tune.objectives[0].metric, prune)
        try:
            with use_callbacks(reporter):
                summary = run_recipe(trial_cfg, run_dir, resume=True, command="tune")
        except TrainingDiverged as e:
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except DistillError as e:
            trial.set_user_attr("error", str(e))
            raise
        row = next(r for r in summary["rows"] if r["name"] == "student_kd")
        val = reporter.last or _last_val(run_dir)
        trial.set_user_attr("test", {k: v for k, v in row.items() if k != "name"})
        trial.set_user_attr("val", {k: v for k, v in val.items() if isinstance(v, int | float)})
        scores = _objective_values(cfg, val, row)
        return scores if multi else scores[0]

    return objective


def _last_val(run_dir: Path) -> dict[str, Any]:
    """The distilled student's last validation record, read back from a finished trial's folder."""
    from distill.report import read_metrics

    recs = [
        r
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("stage") == "student_kd" and r.get("split") == "val"
    ]
    return recs[-1] if recs else {}


def _short(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        s = f"{v:.4g}" if isinstance(v, float) else json.dumps(v, separators=(",", ":"))
        parts.append(f"{k.split('.')[-1]}={s[:40]}")
    return ", ".join(parts)


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
    with _FileLock(out / ".workers.lock"):
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
    """Trials cut short by a crash, a kill or Ctrl-C (failed without an error of their own, or
    running with a stale heartbeat) are queued again with the same values; they resume in the
    folder of their first try. A resumption that is cut short too is queued again, up to
    `MAX_ATTEMPTS` tries in all (so a trial that kills its process every time does not loop)."""
    import optuna
    from optuna.trial import TrialState

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
    from distill.rundir import _first_difference

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
    teacher_path, _ = prepare_teacher(base, out)
    study = open_study(cfg, out, study_name, storage)
    queued = _requeue_interrupted(study)
    done = _finished(study)
    log(
        f"study '{study.study_name}': {done} finished trial(s) so far, target {target}"
        + (f"; resuming interrupted trial(s) {queued}" if queued else "")
    )
    if done < target:
        study.optimize(
            make_objective(cfg, out, teacher_path),
            n_trials=target - done,
            callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))],
            gc_after_trial=False,
        )
    summary = write_outputs(cfg, study, out, base)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------- outputs


def _metric_key(o: TuneObjective) -> str:
    return f"val_{o.metric}" if o.metric in ("accuracy", "nll", "agreement") else o.metric


def trial_rows(cfg: TuneRecipe, study) -> list[dict[str, Any]]:
    """One row per trial: state, objective values, sampled values, test-split measurements."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"name": f"trial_{t.number}", "number": t.number, "state": t.state.name.lower()}
        if t.values is not None:
            for o, v in zip(cfg.tune.objectives, t.values):
                row[_metric_key(o)] = v
        elif t.intermediate_values:
            last = max(t.intermediate_values)
            row[_metric_key(cfg.tune.objectives[0])] = t.intermediate_values[last]
        for k in ("pruned_at_epoch", "resume_of", "run_dir"):
            if k in t.user_attrs:
                row[k] = t.user_attrs[k]
        row.update({k: v for k, v in (t.user_attrs.get("test") or {}).items()})
        row["params_searched"] = dict(t.params)
        if t.datetime_complete and t.datetime_start:
            row["seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        rows.append(row)
    return rows


def _importances(cfg: TuneRecipe, study) -> dict[str, dict[str, float]]:
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, dict[str, float]] = {}
    if len(complete) < 3:
        return out
    for i, o in enumerate(cfg.tune.objectives):
        # the default evaluator (PED-ANOVA in Optuna 4+) ranks what leads to LOW target values
        sign = -1.0 if o.direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, target=(lambda t, i=i, sign=sign: sign * t.values[i])
                )
            out[_metric_key(o)] = {k: round(float(v), 4) for k, v in imp.items()}
        except (RuntimeError, ValueError, ZeroDivisionError, ImportError):
            continue  # e.g. a single distinct value per parameter: no importance to measure
    return out


def _best_trials(cfg: TuneRecipe, study) -> list[Any]:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(cfg.tune.objectives) == 1:
        return [study.best_trial]
    front = list(study.best_trials)
    sign = 1 if cfg.tune.objectives[0].direction == "maximize" else -1
    return sorted(front, key=lambda t: -sign * t.values[0])  # best first objective first


def best_recipe_yaml(cfg: TuneRecipe, trial, teacher_path: str) -> str:
    """The best trial's values applied to the recipe without search/tune: runnable with `distill run`."""
    import optuna

    class _Fixed:
        def __init__(self, params):
            self.params = params

        def suggest_float(self, key, *a, **k):
            return self.params[key]

        suggest_int = suggest_float
        suggest_categorical = suggest_float

    data, values = suggest(_Fixed(trial.params), cfg)
    RecipeConfig.model_validate(data)
    vals = ", ".join(f"{k}={v:.4g}" for k, v in zip([o.metric for o in cfg.tune.objectives], trial.values))
    head = (
        f"# The best configuration of study '{cfg.tune.study_name or cfg.name}' (trial {trial.number}: "
        f"validation {vals}), written by `distill tune` (optuna {optuna.__version__}).\n"
        "# Run it with `distill run <this file>`. Tuned keys:\n"
        + "".join(f"#   {k}: {json.dumps(v)}\n" for k, v in values.items())
        + f"# To reuse the study's teacher instead of training it again: teacher.checkpoint={teacher_path}\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def _plot_history(cfg: TuneRecipe, rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    o = cfg.tune.objectives[0]
    key = _metric_key(o)
    pts = [(r["number"], r[key], r["state"]) for r in rows if isinstance(r.get(key), int | float)]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        xs = [n for n, _, s in pts if s == state]
        ys = [v for _, v, s in pts if s == state]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=state)
    best, bx, by = None, [], []
    for n, v, s in sorted(pts):
        if s != "complete":
            continue
        if best is None or (v > best if o.direction == "maximize" else v < best):
            best = v
        bx.append(n)
        by.append(best)
    if bx:
        ax.step(bx, by, where="post", color="C2", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(key)
    ax.set_title("optimization history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _plot_pareto(cfg: TuneRecipe, rows: list[dict[str, Any]], front: set[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kx, ky = _metric_key(cfg.tune.objectives[1]), _metric_key(cfg.tune.objectives[0])
    pts = [(r[kx], r[ky], r["number"]) for r in rows if r["state"] == "complete" and kx in r and ky in r]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [x for x, _, n in pts if n not in front],
        [y for _, y, n in pts if n not in front],
        color="0.6",
        label="trial",
    )
    fr = sorted((x, y, n) for x, y, n in pts if n in front)
    ax.plot([x for x, _, _ in fr], [y for _, y, _ in fr], "o-", color="C3", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, n in fr:  # trials with equal values share one label
        labels.setdefault((x, y), []).append(str(n))
    for (x, y), ns in labels.items():
        ax.annotate(",".join(ns), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if kx in ("params", "size_mb") or (
        pts and max(p[0] for p in pts) > 20 * max(min(p[0] for p in pts), 1e-12)
    ):
        ax.set_xscale("log")
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int | str):
        return str(v)
    return json.dumps(v, separators=(",", ":"))


def _short_names(keys: list[str]) -> list[str]:
    """The shortest dotted suffix of each key that tells it apart from the others."""
    names = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        names.append(suffix)
    return names


def trials_table(cfg: TuneRecipe, rows: list[dict[str, Any]]) -> str:
    keys = [_metric_key(o) for o in cfg.tune.objectives]
    extra = [k for k in ("accuracy", "params", "latency_ms_b1") if k not in keys]
    searched = list(cfg.search)
    head = ["trial", "state", *keys, *[f"test {k}" if k == "accuracy" else k for k in extra]]
    head += _short_names(searched)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["number"]),
            r["state"] + (f" (epoch {r['pruned_at_epoch']})" if "pruned_at_epoch" in r else ""),
        ]
        cells += [_fmt(r[k]) if k in r else "" for k in keys + extra]
        ps = r["params_searched"]
        cells += [_fmt(ps[k])[:40] if k in ps else "" for k in searched]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _study_wall(study) -> float | None:
    """Seconds from the first trial's start to the last trial's end, over every session."""
    ts = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in ts if t.datetime_start]
    ends = [t.datetime_complete for t in ts if t.datetime_complete]
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None


def write_outputs(cfg: TuneRecipe, study, out: Path, base: RecipeConfig) -> dict[str, Any]:
    """summary.json (one row per trial), report.md, plots and best_recipe.yaml."""
    import optuna

    rows = trial_rows(cfg, study)
    best = _best_trials(cfg, study)
    importances = _importances(cfg, study)
    teacher_path = str((out / "teacher.safetensors").resolve())
    if base.teacher.checkpoint:
        teacher_path = base.teacher.checkpoint
    teacher_row = json.loads((out / "teacher.json").read_text()) if (out / "teacher.json").exists() else None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary: dict[str, Any] = {
        "command": "tune",
        "recipe": cfg.name,
        "study": study.study_name,
        "objectives": [o.model_dump() for o in cfg.tune.objectives],
        "optuna": optuna.__version__,
        "counts": counts,
        "study_wall_seconds": _study_wall(study),
        "teacher": teacher_row,
        "best": [r for r in rows if r["number"] in {t.number for t in best}][:1],
        "pareto": [t.number for t in best] if len(cfg.tune.objectives) > 1 else [],
        "importances": importances,
        "rows": rows,
    }
    md = [f"# distill tune: {cfg.name} (study '{study.study_name}')", ""]
    md.append(
        f"{len(rows)} trials: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ". Objectives: "
        + ", ".join(f"{o.direction} {_metric_key(o)}" for o in cfg.tune.objectives)
        + " (validation split; `test accuracy` is reported, never optimised)."
    )
    if teacher_row:
        md.append(
            f"\nTeacher (trained once, shared): test accuracy {teacher_row.get('accuracy', float('nan')):.4f}, "
            f"{teacher_row.get('params', 0):,} params."
        )
    if best:
        b = best[0]
        md += [
            "",
            "## Best",
            "",
            f"Trial {b.number}: "
            + ", ".join(f"{_metric_key(o)} {v:.4g}" for o, v in zip(cfg.tune.objectives, b.values))
            + f"; run folder `{b.user_attrs.get('run_dir', '')}`. Ready-to-run recipe: `best_recipe.yaml`.",
            "",
        ]
        md += [f"- `{k}`: `{_fmt(v)}`" for k, v in b.params.items()]
        atomic_write_text(out / "best_recipe.yaml", best_recipe_yaml(cfg, b, teacher_path))
    if len(cfg.tune.objectives) > 1 and best:
        md += ["", "## Pareto front", "", "Trials " + ", ".join(str(t.number) for t in best) + "."]
        if _plot_pareto(cfg, rows, {t.number for t in best}, out / "pareto.png"):
            md += ["", "![Pareto front](pareto.png)"]
    if importances:
        md += ["", "## Hyperparameter importance", ""]
        for k, imp in importances.items():
            md.append(f"{k}: " + ", ".join(f"`{p}` {v:.2f}" for p, v in imp.items()))
    else:
        md += ["", "Hyperparameter importance: not available (needs 3+ complete trials with varied values)."]
    if _plot_history(cfg, rows, out / "history.png"):
        md += ["", "![optimization history](history.png)"]
    md += ["", "## Trials", "", trials_table(cfg, rows), ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return summary
