"""Issue 18: what cost a new user a retrain or left clutter, each reproduced and fixed."""

import json
from pathlib import Path

import pytest
import yaml

from distill import ConfigError, DistillError
from distill.cli import main
from distill.run.config import load_yaml
from distill.run.rundir import RunDir
from helpers import tiny_recipe


def _write(tmp_path, cfg, name="tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(cfg.to_yaml())
    return p


# --------------------------------------------------------------------------- bug 2: empty recipes


def test_empty_or_near_empty_recipe_is_an_error_naming_what_is_missing(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty: a recipe names at least its teacher: and student:"):
        load_yaml(empty)
    assert main(["run", str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written

    near = tmp_path / "near.yaml"
    near.write_text("name: mine\nteacher: {name: cnn}\n")
    assert main(["run", str(near), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing: student" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- bug 3: failed runs


def test_a_run_that_failed_before_finishing_anything_is_reclaimed(tmp_path, capsys):
    recipe = _write(tmp_path, tiny_recipe(tmp_path, **{"teacher.class_path": "nowhere.Model", "teacher.name": "null"}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert (out / "config.yaml").exists()
    capsys.readouterr()
    # the rerun meets the same error again, not "already holds a run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds" not in err and "nowhere" in err

    # a folder with a finished stage is still protected
    (out / "checkpoints" / "teacher").mkdir(parents=True)
    (out / "checkpoints" / "teacher" / "final.safetensors").write_bytes(b"x")
    with pytest.raises(DistillError, match="already holds a run"):
        RunDir(out, "name: other\n")
    # a folder with only the config, the log and TensorBoard files is reclaimed, emptied
    (out / "checkpoints" / "teacher" / "final.safetensors").unlink()
    (out / "metrics.jsonl").write_text('{"stage": "teacher", "step": 1}\n')
    (out / "tensorboard" / "teacher").mkdir(parents=True)
    (out / "tensorboard" / "teacher" / "events").write_text("x")
    with RunDir(out, "name: other\n"):
        assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"name": "other"}


# --------------------------------------------------------------------------- bug 6: threads


def test_trainer_threads_reach_the_teachers_own_training(tmp_path):
    import torch

    from distill.engine.trainer import use_callbacks
    from distill.run.pipeline import run_recipe

    seen = {}

    class Threads:
        def on_evaluate(self, trainer, metrics):
            seen[trainer.stage] = torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    cfg = tiny_recipe(tmp_path, **{"trainer.threads": 1, "teacher.train.threads": "null", "baselines": "[]"})
    assert cfg.teacher.train.threads is None
    try:
        with use_callbacks(Threads()):
            run_recipe(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert seen == {"teacher": 1, "student_kd": 1}
