"""`distill tune`: search-space validation, a tiny study, resuming it from SQLite, pruning, Pareto mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.errors import ConfigError
from distill.run.config import parse_recipe

optuna = pytest.importorskip("optuna")

from distill import tune  # noqa: E402
from distill.tune import space, trials  # noqa: E402
from distill.tune import study as tune_study  # noqa: E402


def _recipe(teacher: dict, **extra) -> dict:
    data = {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "digits", "init_args": {"train_limit": 300}, "batch_size": 64},
        "teacher": teacher,
        "student": {"name": "mlp", "init_args": {"hidden": [16]}},
        "objective": {
            "terms": {
                "ce": {"name": "ce", "weight": 0.5},
                "kd": {"name": "kd", "weight": 0.5, "init_args": {"temperature": 4.0}},
            }
        },
        "trainer": {"epochs": 3, "progress": "off", "tensorboard": False},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
        "search": {
            "trainer.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "objective.terms.kd.init_args.temperature": {"type": "float", "low": 1.0, "high": 8.0},
        },
        "tune": {"seed": 0, "pruner": "none"},
    }
    data.update(extra)
    return data


TRAINED_TEACHER = {
    "name": "mlp",
    "init_args": {"hidden": [32]},
    "train": {"epochs": 2, "progress": "off", "tensorboard": False},
}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A small teacher's weights (untrained: the tests exercise the study, not the teacher)."""
    from distill.checkpoint import save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model

    spec = {"name": "mlp", "class_path": None, "init_args": {"hidden": [32]}}
    model = build_model(spec, build_data("digits", None, {"train_limit": 300}, seed=0))
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(path, model.state_dict())
    return str(path)


def _ckpt_teacher(path: str) -> dict:
    return {"name": "mlp", "init_args": {"hidden": [32]}, "checkpoint": path}


# --------------------------------------------------------------------------- the search space


@pytest.mark.parametrize(
    "search, message",
    [
        ({"trainer.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "empty range"),
        ({"trainer.epochs": {"type": "int", "low": 5, "high": 5}}, "empty range"),
        (
            {"trainer.optimiser.lr": {"type": "float", "low": 0.001, "high": 0.1}},
            "did you mean 'trainer.optimizer.lr'",
        ),
        ({"trainer.lr": {"type": "float", "low": 0.001, "high": 0.1}}, "unknown recipe key"),
        ({"trainer.optimizer.lr": {"type": "floot", "low": 0.001, "high": 0.1}}, "is not one of"),
        ({"trainer.optimizer.lr": {"type": "float", "lo": 0.001, "high": 0.1}}, "did you mean"),
        (
            {"trainer.optimizer.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
            "log scale needs low > 0",
        ),
        ({"trainer.epochs": {"type": "int", "low": 1.5, "high": 4}}, "whole numbers"),
        ({"trainer.epochs": {"type": "float", "low": 1.0, "high": 4.5}}, "does not fit the recipe"),
        (
            {"trainer.optimizer.name": {"type": "categorical", "choices": ["adamw", "lion"]}},
            "'lion' is not one of",
        ),
        ({"trainer.optimizer.name": {"type": "categorical", "choices": []}}, "non-empty 'choices'"),
        ({"trainer.optimizer.lr": {"type": "float", "high": 0.1}}, "needs both 'low' and 'high'"),
        ({"teacher.train.epochs": {"type": "int", "low": 1, "high": 3}}, "shared by all trials"),
        ({}, "is empty"),
    ],
)
def test_bad_search_space_is_one_clear_line(search, message):
    data = _recipe(TRAINED_TEACHER)
    data["search"] = search
    with pytest.raises(ConfigError, match="search") as e:
        tune.parse_tune_recipe(data, source="r.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_free_init_args_and_structural_choices_are_accepted():
    data = _recipe(TRAINED_TEACHER)
    data["search"] = {
        "student.init_args.dropout": {"type": "float", "low": 0.0, "high": 0.3},  # not set in the recipe
        "objective.terms": {
            "type": "categorical",
            "labels": ["kd", "mse"],
            "choices": [
                {"ce": {"name": "ce", "weight": 0.5}, "kd": {"name": "kd", "weight": 0.5}},
                {"ce": {"name": "ce", "weight": 0.5}, "mse": {"name": "logit_mse", "weight": 0.5}},
            ],
        },
        "objective.terms.kd.weight": {"type": "float", "low": 0.1, "high": 1.0},
        "objective.terms.mse.weight": {"type": "float", "low": 0.1, "high": 1.0},
    }
    cfg = tune.parse_tune_recipe(data)
    # define-by-run: the weight of the term that the chosen set lacks is not sampled
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        recipe, values = space.suggest(trial, cfg)
        parse_recipe(recipe)
        chosen = values["objective.terms"]
        assert ("objective.terms.kd.weight" in values) == ("kd" in chosen)
        assert ("objective.terms.mse.weight" in values) == ("mse" in chosen)
        seen.add(trial.params["objective.terms"])
        study.tell(trial, 0.0)
    assert seen == {"kd", "mse"}


def test_import_tune_does_not_import_optuna():
    code = "import sys, distill.tune, distill.cli.tune; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- studies


def _states(out) -> list[str]:
    return [r["state"] for r in json.loads((out / "summary.json").read_text())["rows"]]


def test_tiny_study_runs_then_resumes_from_sqlite(tmp_path):
    cfg = tune.parse_tune_recipe(_recipe(TRAINED_TEACHER))
    out = tmp_path / "study"
    s1 = tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    assert [r["number"] for r in s1["rows"]] == [0, 1]
    assert all(r["state"] == "complete" for r in s1["rows"])
    for r in s1["rows"]:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and "accuracy" in r and "params" in r
        assert (out / "trials" / str(r["number"]) / "summary.json").exists()  # a normal run folder
    teacher = out / "teacher.safetensors"
    mtime = teacher.stat().st_mtime_ns
    assert (out / "study.db").exists() and (out / "report.md").exists() and (out / "history.png").exists()

    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert "search" not in best and "tune" not in best
    best_cfg = parse_recipe(best)
    lr = s1["best"][0]["params_searched"]["trainer.optimizer.lr"]
    assert best_cfg.trainer.optimizer.lr == pytest.approx(lr)

    # a second invocation continues the same study: trial count preserved, teacher reused
    s2 = tune.run_tune(cfg, out, trials=3, log=lambda *_: None)
    assert [r["number"] for r in s2["rows"]] == [0, 1, 2]
    assert [r["params_searched"] for r in s2["rows"][:2]] == [r["params_searched"] for r in s1["rows"]]
    assert teacher.stat().st_mtime_ns == mtime
    # reaching the target runs nothing more
    assert len(tune.run_tune(cfg, out, trials=3, log=lambda *_: None)["rows"]) == 3

    # a different search space in the same folder is refused
    other = _recipe(TRAINED_TEACHER)
    other["search"]["trainer.optimizer.lr"]["high"] = 0.1
    with pytest.raises(ConfigError, match="different recipe"):
        tune.run_tune(tune.parse_tune_recipe(other), out, trials=4, log=lambda *_: None)


def test_interrupted_trial_resumes_in_its_folder(tmp_path, teacher_ckpt, monkeypatch):
    cfg = tune.parse_tune_recipe(_recipe(_ckpt_teacher(teacher_ckpt)))
    out = tmp_path / "study"
    real = trials._TrialReporter.on_evaluate

    def crash(self, trainer, metrics):
        real(self, trainer, metrics)
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C hit the second epoch of trial 0

    monkeypatch.setattr(trials._TrialReporter, "on_evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    monkeypatch.setattr(trials._TrialReporter, "on_evaluate", real)
    assert (out / "trials" / "0" / "checkpoints" / "student_kd" / "last.safetensors").exists()

    s = tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    states = {r["number"]: r for r in s["rows"]}
    assert states[0]["state"] == "fail"
    assert states[1]["resume_of"] == 0 and states[1]["state"] == "complete"
    assert states[1]["params_searched"] == states[0]["params_searched"]
    assert states[1]["run_dir"].endswith("trials/0")
    # the resumed trial trained only the missing epoch: epochs 1-2 were logged once
    val = [
        json.loads(line)
        for line in (out / "trials" / "0" / "metrics.jsonl").read_text().splitlines()
        if '"split": "val"' in line
    ]
    assert [v["epoch"] for v in val] == [1, 2, 3]
    assert _states(out).count("complete") == 2


def test_weak_trials_are_pruned(tmp_path, teacher_ckpt):
    data = _recipe(_ckpt_teacher(teacher_ckpt))
    data["search"] = {"trainer.optimizer.lr": {"type": "float", "low": 1e-6, "high": 3e-2, "log": True}}
    data["tune"] = {"seed": 0, "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0}
    cfg = tune.parse_tune_recipe(data)
    out = tmp_path / "study"
    out.mkdir()
    study = tune_study.open_study(cfg, out)
    study.enqueue_trial({"trainer.optimizer.lr": 3e-2})  # learns: sets the median
    study.enqueue_trial({"trainer.optimizer.lr": 1e-6})  # barely moves: below the median after epoch 1
    s = tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    rows = {r["number"]: r for r in s["rows"]}
    assert rows[0]["state"] == "complete"
    assert rows[1]["state"] == "pruned" and rows[1]["pruned_at_epoch"] == 1
    assert rows[1]["val_accuracy"] < rows[0]["val_accuracy"]
    assert not (out / "trials" / "1" / "summary.json").exists()  # stopped before the end
    assert "pruned" in (out / "report.md").read_text()


def test_multi_objective_pareto(tmp_path, teacher_ckpt):
    data = _recipe(_ckpt_teacher(teacher_ckpt))
    data["search"] = {
        "student.init_args.hidden": {"type": "categorical", "choices": [[4], [16], [64, 32]]},
        "trainer.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    }
    data["tune"] = {
        "seed": 0,
        "objectives": [
            {"metric": "accuracy", "direction": "maximize"},
            {"metric": "params", "direction": "minimize"},
        ],
    }
    cfg = tune.parse_tune_recipe(data)
    out = tmp_path / "study"
    s = tune.run_tune(cfg, out, trials=4, log=lambda *_: None)
    assert s["pareto"] and (out / "pareto.png").exists()
    rows = {r["number"]: r for r in s["rows"]}
    front = [rows[n] for n in s["pareto"]]
    for a in front:  # no trial on the front is dominated by another trial
        for b in rows.values():
            assert not (
                b["val_accuracy"] >= a["val_accuracy"]
                and b["params"] <= a["params"]
                and (b["val_accuracy"], b["params"]) != (a["val_accuracy"], a["params"])
            )
    parse_recipe(yaml.safe_load((out / "best_recipe.yaml").read_text()))


def test_cli_reports_bad_recipe_in_one_line(tmp_path, capsys):
    import argparse

    from distill.cli import tune as cli_tune

    data = _recipe(TRAINED_TEACHER)
    data["search"] = {"trainer.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    parser = argparse.ArgumentParser()
    cli_tune.add_parser(parser.add_subparsers(dest="command"))
    rc = cli_tune.main(parser.parse_args(["tune", str(path), "--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "empty range" in err


@pytest.mark.parametrize(
    "name",
    [
        "tune_digits.yaml",
        "tune_digits_pareto.yaml",
        "tune_multi_teacher_digits.yaml",
        "tune_lm_fortunes.yaml",
    ],
)
def test_shipped_tune_recipes_parse_and_sample(name):
    from pathlib import Path

    cfg = tune.load_tune_recipe(Path(__file__).parent.parent / "recipes" / name)
    study = optuna.create_study(
        directions=[o.direction for o in cfg.tune.objectives], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    for _ in range(5):
        trial = study.ask()
        recipe, _ = space.suggest(trial, cfg)
        parse_recipe(recipe)
        study.tell(trial, [0.0] * len(cfg.tune.objectives))
    assert (
        tune_study._pruner(cfg) is not None
        and tune_study._sampler(cfg.tune, len(cfg.tune.objectives) > 1) is not None
    )


def test_hyperband_covers_the_searched_epochs():
    data = _recipe(TRAINED_TEACHER)
    data["search"]["trainer.epochs"] = {"type": "int", "low": 2, "high": 9}
    data["tune"] = {"pruner": "hyperband"}
    pruner = tune_study._pruner(tune.parse_tune_recipe(data))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._max_resource == 9


def test_concurrent_workers_get_different_sampler_seeds(tmp_path):
    cfg = tune.parse_tune_recipe(_recipe(TRAINED_TEACHER))
    assert [tune_study._worker_index(tmp_path) for _ in range(3)] == [0, 1, 2]
    draws = []
    for worker in (0, 1):
        study = optuna.create_study(sampler=tune_study._sampler(cfg.tune, False, worker))
        draws.append(study.ask().suggest_float("x", 0, 1))
    assert draws[0] != draws[1]


def test_trainer_on_evaluate_hook_and_ambient_callbacks():
    from torch import nn

    from distill import CrossEntropy, Objective
    from distill.engine.trainer import Trainer, use_callbacks
    from helpers import blobs

    class Recorder:
        def __init__(self, stop_at=None):
            self.epochs, self.stop_at = [], stop_at

        def on_evaluate(self, trainer, metrics):
            self.epochs.append(metrics["epoch"])
            assert "accuracy" in metrics and trainer.epoch == metrics["epoch"]
            if metrics["epoch"] == self.stop_at:
                raise StopIteration("stop")

    def make(**kw):
        model = nn.Sequential(nn.Linear(8, 3))
        return Trainer(
            model,
            Objective({"ce": CrossEntropy()}),
            blobs(),
            val_data=blobs(seed=1),
            epochs=3,
            progress="off",
            batch_size=32,
            **kw,
        )

    direct, ambient, other = Recorder(), Recorder(stop_at=2), Recorder()
    with use_callbacks(ambient):
        trainer = make(callbacks=[direct])
    with pytest.raises(StopIteration):  # an exception in a hook stops training and propagates
        trainer.fit()
    assert direct.epochs == [1, 2] and ambient.epochs == [1, 2] and trainer.epoch == 2
    make(callbacks=[other]).fit()  # outside the with block: only its own callback
    assert other.epochs == [1, 2, 3] and ambient.epochs == [1, 2]


def test_teacher_checkpoint_choice_and_calibration_are_tunable(tmp_path):
    search = {
        "teacher.use": {"type": "categorical", "choices": ["best", 1]},
        "teacher.calibrate": {"type": "categorical", "choices": [True]},
    }
    cfg = tune.parse_tune_recipe(_recipe(TRAINED_TEACHER, search=search))
    out = tmp_path / "study"
    s = tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    assert all(r["state"] == "complete" for r in s["rows"])
    used = set()
    for r in s["rows"]:
        saved = yaml.safe_load((out / "trials" / str(r["number"]) / "config.yaml").read_text())
        used.add(Path(saved["teacher"]["checkpoint"]).name)
        row = json.loads((out / "trials" / str(r["number"]) / "summary.json").read_text())["rows"][0]
        assert row["temperature"] > 0  # calibrated before distilling
    assert used <= {"best.safetensors", "epoch1.safetensors"} and used


def test_a_language_model_study_minimises_perplexity_by_default():
    from distill.tune.config import parse_tune_recipe

    data = _recipe(TRAINED_TEACHER)
    data["search"] = {"trainer.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    assert [(o.metric, o.direction) for o in parse_tune_recipe(data).tune.objectives] == [
        ("accuracy", "maximize")
    ]
    data["evaluator"] = {"name": "perplexity"}  # a language model: its token accuracy is not the measure
    assert [(o.metric, o.direction) for o in parse_tune_recipe(data).tune.objectives] == [
        ("perplexity", "minimize")
    ]
    data["tune"] = {
        "objectives": [{"metric": "accuracy", "direction": "maximize"}]
    }  # what the user says wins
    assert parse_tune_recipe(data).tune.objectives[0].metric == "accuracy"
