"""One trial = one normal recipe run, distilling from a teacher trained once for the study."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write_text
from distill.errors import ConfigError, DistillError, TrainingDiverged
from distill.run.config import RecipeConfig, TeacherConfig
from distill.tune.config import TuneRecipe
from distill.tune.space import suggest

# --------------------------------------------------------------------------- the teacher, once


class FileLock:
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


def prepare_teacher(cfg: RecipeConfig, out: Path) -> tuple[str | None, dict[str, Any] | None]:
    """Returns the path of the teacher's weights that every trial loads, training the teacher once
    (in `<out>/teacher/`, resumable) when the recipe gives no checkpoint; and its measured row.
    A teacher with neither checkpoint nor train: section (a pretrained `hf` model, a GGUF file)
    is used as the recipe gives it: None."""
    return _prepare(cfg, cfg.teacher, "teacher", out)


def prepare_teachers(cfg: RecipeConfig, out: Path) -> list[str | None]:
    """The weights every trial loads, per teacher: one path for `teacher:`; for `teachers:` one per
    member, each trained once in `<out>/teacher<i>/` (the ensemble is combined per trial, so its
    rule, tau and weights can be tuned)."""
    if not cfg.teachers:
        return [prepare_teacher(cfg, out)[0]]
    return [_prepare(cfg, tc, f"teacher{i}", out)[0] for i, tc in enumerate(cfg.teachers)]


def _prepare(
    cfg: RecipeConfig, tc: TeacherConfig, name: str, out: Path
) -> tuple[str | None, dict[str, Any] | None]:
    if tc.checkpoint:
        return tc.checkpoint, None
    if tc.train is None:
        return None, None
    from distill.checkpoint import load_weights, save_weights
    from distill.data.bundle import build_data
    from distill.engine.trainer import seed_everything
    from distill.models.build import build_model
    from distill.run.pipeline import build_adapter, measure, scratch_objective, train_stage
    from distill.run.rundir import RunDir

    path = out / f"{name}.safetensors"
    row_path = out / f"{name}.json"
    with FileLock(out / f".{name}.lock"):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        seed_everything(cfg.seed)
        model = build_model(tc.spec(), data)
        if path.exists() and row_path.exists():
            return str(path.resolve()), json.loads(row_path.read_text())
        adapter = build_adapter(tc.adapter)
        teacher_cfg = cfg.model_copy(update={"baselines": []})
        # every epoch's weights are kept, so trials may tune teacher.use (last, best, epoch N)
        epochs = list(range(1, tc.train.epochs + 1))
        with RunDir(out / name, teacher_cfg.to_yaml(), resume=True):
            train_stage(
                name,
                model,
                scratch_objective(cfg),
                data,
                cfg,
                tc.train.model_copy(update={"keep_epochs": epochs}),
                out / name,
                adapter=adapter,
            )
        save_weights(path, model.state_dict(), {"stage": name})
        load_weights(model, path)
        row = measure(name, model, data, cfg, None, adapter=adapter)
        atomic_write_text(row_path, json.dumps(row, indent=2))
        return str(path.resolve()), row


def teacher_weights(out: Path, final: str, use: Any, name: str = "teacher") -> str:
    """The weights file of the study's teacher `name` that `teacher.use` names (last, best, an epoch)."""
    if use in (None, "last"):
        return final
    folder = out / name / "checkpoints" / name
    path = folder / ("best.safetensors" if use == "best" else f"epoch{use}.safetensors")
    if not path.exists():
        raise ConfigError(
            f"teacher.use: {use} was not saved for this study's teacher (in {folder}); "
            "use last, best or an epoch up to teacher.train.epochs"
        )
    return str(path.resolve())


def pin_teachers(data: dict[str, Any], out: Path, paths: list[str | None]) -> None:
    """Points a trial's recipe (as data) at the study's teacher weights (`prepare_teachers`)."""
    named = (
        [("teacher", data["teacher"])]
        if not data.get("teachers")
        else list((f"teacher{i}", tc) for i, tc in enumerate(data["teachers"]))
    )
    for (name, tc), final in zip(named, paths, strict=True):
        if final is None:
            continue  # a pretrained teacher, used as the recipe gives it
        tc["checkpoint"] = teacher_weights(out, final, tc.get("use", "last"), name)
        tc["train"] = None
        tc["use"] = "last"  # resolved to its file above


# --------------------------------------------------------------------------- trials


def claim_trial(trial: Any, pid: int | None = None) -> None:
    """Records the machine and process that run `trial`, so that the next start on this machine
    tells at once that the process died (see `study.dead_owner`) instead of waiting for the
    heartbeat grace."""
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": pid or os.getpid()})


def dead_owner(user_attrs: dict[str, Any]) -> bool:
    """True when the trial's recorded process ran on this machine and no longer exists. A trial of
    another machine (shared storage) or without a record is left to the heartbeat grace."""
    owner = user_attrs.get("owner")
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user holds that id now
    return False


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


def make_objective(cfg: TuneRecipe, out: Path, teacher_paths: list[str | None]):
    """The function Optuna calls per trial: samples, runs the recipe in its own folder, scores it."""
    import optuna

    from distill.engine.trainer import use_callbacks
    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    multi = len(cfg.tune.objectives) > 1
    prune = not multi and cfg.tune.pruner != "none"

    def objective(trial: optuna.Trial):
        claim_trial(trial)
        data, values = suggest(trial, cfg)
        pin_teachers(data, out, teacher_paths)
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
    from distill.run.report import read_metrics

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
