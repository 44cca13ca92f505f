"""One build pass: the components `distill run` checks before training are the ones it trains
(DESIGN.md, "Build each component once per run")."""

import pytest
import torch
from safetensors.torch import load_file

from distill.models.small import MLP, SmallCNN
from distill.run import pipeline
from distill.run.config import parse_recipe

BUILDS = {"student": 0, "teacher": 0}


class CountingStudent(MLP):
    def __init__(self, **kw):
        BUILDS["student"] += 1
        super().__init__(**kw)


class CountingTeacher(SmallCNN):  # BatchNorm: the one-batch check moves its statistics
    def __init__(self, **kw):
        BUILDS["teacher"] += 1
        super().__init__(**kw)


def _recipe(tmp_path, trained: bool, baselines=()):
    teacher = {"class_path": f"{__name__}.CountingTeacher", "init_args": {"channels": [8, 16]}}
    if trained:
        teacher["train"] = {"epochs": 1, "progress": "off", "tensorboard": False}
    else:
        torch.manual_seed(5)
        from distill.checkpoint import save_weights

        save_weights(tmp_path / "t.safetensors", SmallCNN(channels=[8, 16]).state_dict())
        teacher["checkpoint"] = str(tmp_path / "t.safetensors")
    return parse_recipe(
        {
            "name": "one_build",
            "data": {"name": "digits", "init_args": {"train_limit": 60}, "batch_size": 32},
            "teacher": teacher,
            "student": {"class_path": f"{__name__}.CountingStudent", "init_args": {"hidden": [16]}},
            "objective": {
                "terms": {"ce": {"name": "ce", "weight": 0.5}, "kd": {"name": "kd", "weight": 0.5}}
            },
            "trainer": {"epochs": 1, "progress": "off", "tensorboard": False},
            "baselines": list(baselines),
            "report": {"latency_batch_sizes": [1], "latency_repeats": 1},
        }
    )


def _run(cfg, out):
    BUILDS.update(student=0, teacher=0)
    summary = pipeline.run_recipe(cfg, out)
    weights = load_file(out / "checkpoints" / "student_kd" / "final.safetensors")
    return dict(BUILDS), summary, weights


@pytest.mark.parametrize("trained", [False, True], ids=["teacher_checkpoint", "teacher_trained_here"])
def test_each_component_is_built_once_and_trains_as_before(tmp_path, monkeypatch, trained):
    cfg = _recipe(tmp_path, trained)
    builds, summary, weights = _run(cfg, tmp_path / "one")
    assert builds == {"student": 1, "teacher": 1}
    # the same run building everything twice (preflight's objects dropped), as before: same result
    original = pipeline.preflight_recipe
    monkeypatch.setattr(pipeline, "preflight_recipe", lambda cfg, data=None, built=None: original(cfg, data))
    builds_twice, summary_twice, weights_twice = _run(cfg, tmp_path / "two")
    assert builds_twice == {"student": 2, "teacher": 2}
    assert weights.keys() == weights_twice.keys()
    assert all(torch.equal(weights[k], weights_twice[k]) for k in weights)
    acc = {r["name"]: r["accuracy"] for r in summary["rows"]}
    assert acc == {r["name"]: r["accuracy"] for r in summary_twice["rows"]}


def test_a_scratch_twin_trains_its_own_student(tmp_path):
    builds, summary, _ = _run(_recipe(tmp_path, False, baselines=["scratch"]), tmp_path / "run")
    assert builds == {"student": 2, "teacher": 1}  # one student per trained stage, the teacher once
    assert [r["name"] for r in summary["rows"]] == ["teacher", "student_scratch", "student_kd"]
