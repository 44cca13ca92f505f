"""A recipe's `class_path` is resolved and checked to be what its slot builds before anything is
called (issue 27, item 4): `class_path: os.system` used to run its command, in `distill check` too."""

from __future__ import annotations

import pytest
import torch
import yaml

from distill.cli import main as cli
from distill.data.bundle import build_data
from distill.errors import ConfigError
from distill.models.build import build_model
from distill.registry import EVALUATORS, LOSSES, SCHEDULES


def _recipe(tmp_path, **sections):
    base = {
        "name": "hostile",
        "teacher": {"name": "mlp", "init_args": {"hidden": [8]}, "train": {"epochs": 1}},
        "student": {"name": "mlp", "init_args": {"hidden": [8]}},
        "trainer": {"epochs": 1},
        **sections,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


@pytest.mark.parametrize("command", ["check", "run"])
def test_class_path_os_system_is_refused_before_it_runs(tmp_path, capsys, command):
    flag = tmp_path / "pwned"
    student = {"class_path": "os.system", "init_args": {"command": f"touch {flag}"}}
    recipe = _recipe(tmp_path, student=student)
    assert (
        cli([command, recipe, "--out", str(tmp_path / "run")] if command == "run" else [command, recipe]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class_path 'os.system' names the built-in function" in err[0], err
    assert "not a model (an nn.Module subclass)" in err[0]
    assert not flag.exists()


def test_functions_and_classes_of_the_wrong_kind_are_never_called(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    with pytest.raises(
        ConfigError, match=r"'shutil.rmtree' names the function shutil.rmtree of Python's standard"
    ):
        build_data(class_path="shutil.rmtree", init_args={"path": str(victim)})
    with pytest.raises(ConfigError, match=r"subprocess.Popen of Python's standard library, not a loss term"):
        LOSSES.build(class_path="subprocess.Popen", init_args={"args": ["touch", str(tmp_path / "x")]})
    with pytest.raises(
        ConfigError, match=r"names the class torch.nn.modules.linear.Linear, not a data builder"
    ):
        build_data(class_path="torch.nn.Linear", init_args={"in_features": 1, "out_features": 1})
    with pytest.raises(
        ConfigError, match=r"names the class torch.nn.modules.linear.Linear, not an evaluator"
    ):
        EVALUATORS.build(class_path="torch.nn.Linear", init_args={"in_features": 1, "out_features": 1})
    with pytest.raises(ConfigError, match=r"distill.checkpoint.atomic_write_text, not a model"):
        build_model({"class_path": "distill.checkpoint.atomic_write_text", "init_args": {}})
    with pytest.raises(ConfigError, match=r"builtins.eval"):
        SCHEDULES.build(class_path="builtins.eval", init_args={})
    assert victim.exists() and not (tmp_path / "x").exists()


def test_what_a_slot_builds_is_still_accepted(tmp_path, monkeypatch):
    from distill.registry import add_import_dir

    linear = build_model(
        {"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 3}}
    )
    assert isinstance(linear, torch.nn.Linear)
    assert LOSSES.build(class_path="distill.losses.logits.KD", init_args={"temperature": 2.0}) is not None
    # a builder of the user's own, in a file beside the recipe, need not be annotated
    (tmp_path / "mine_beside.py").write_text(
        "from torch import nn\n\ndef student(width=4):\n    return nn.Linear(2, width)\n"
    )
    add_import_dir(tmp_path)
    assert isinstance(build_model({"class_path": "mine_beside.student", "init_args": {}}), torch.nn.Linear)
    # distill's own functions: registered, or annotated to return the slot's kind
    data = build_data(
        class_path="distill.compress.standins.token_standin", init_args={"train": 4, "val": 2, "test": 2}
    )
    assert len(data.train) == 4
