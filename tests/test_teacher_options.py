"""Recipe options for the teacher side: several teachers in YAML, which checkpoint teaches, calibration,
transfer sets."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.checkpoint import load_weights
from distill.data.bundle import build_data
from distill.errors import ConfigError
from distill.models.build import build_model
from distill.run.config import RecipeConfig, parse_recipe
from distill.run.pipeline import run_recipe
from distill.teachers.calibration import fit_temperature
from helpers import tiny_recipe

SMALL_CNN = {"name": "cnn", "init_args": {"channels": [8, 16]}, "train": {"epochs": 2, "tensorboard": False}}
SMALL_MLP = {"name": "mlp", "init_args": {"hidden": [32]}, "train": {"epochs": 2, "tensorboard": False}}


def _two_teachers(tmp_path, **ensemble):
    cfg = tiny_recipe(tmp_path)
    data = cfg.model_dump(mode="json", exclude={"teacher"})
    data["teachers"] = [SMALL_CNN, SMALL_MLP]
    data["ensemble"] = {"rule": "entropy", "tau": 0.5, **ensemble}
    return parse_recipe(data)


def test_teachers_in_yaml_distil_from_the_ensemble(tmp_path):
    cfg = _two_teachers(tmp_path)
    summary = run_recipe(cfg, tmp_path / "run")
    names = [r["name"] for r in summary["rows"]]
    assert names == ["teacher", "teacher0", "teacher1", "student_scratch", "student_kd"]
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["teacher"]["params"] == rows["teacher0"]["params"] + rows["teacher1"]["params"]
    assert rows["teacher"]["rule"] == "entropy" and 0 < rows["teacher"]["train_confidence"] <= 1
    # the saved config reloads as is (teachers, no teacher section)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert "teacher" not in saved and parse_recipe(saved) == cfg


def test_teacher_and_teachers_together_or_one_teacher_are_refused(tmp_path):
    data = RecipeConfig().model_dump(mode="json")
    data["teachers"] = [SMALL_CNN, SMALL_MLP]
    with pytest.raises(ConfigError, match="give teacher: \\(one\\) or teachers: \\(an ensemble\\), not both"):
        parse_recipe(data)
    del data["teacher"]
    data["teachers"] = [SMALL_CNN]
    with pytest.raises(ConfigError, match="teachers: lists at least two"):
        parse_recipe(data)
    data["teachers"] = [SMALL_CNN, SMALL_MLP]
    data["ensemble"] = {"rule": "learned"}
    with pytest.raises(ConfigError, match="ensemble.rule: 'learned' is not one of"):
        parse_recipe(data)


def test_teacher_use_epoch_best_and_calibration(tmp_path):
    cfg = tiny_recipe(tmp_path, **{"teacher.use": 1, "teacher.calibrate": True, "teacher.train.epochs": 3})
    summary = run_recipe(cfg, tmp_path / "run")
    teacher = summary["rows"][0]
    epoch1 = tmp_path / "run" / "checkpoints" / "teacher" / "epoch1.safetensors"
    assert teacher["use"] == 1 and epoch1.exists()
    # recomputed here: the temperature is the best-NLL one of the epoch-1 weights on the validation
    # split, and the teacher the run measured (and distilled from) divides its logits by it
    data = build_data("digits", None, cfg.data.init_args, seed=cfg.seed)
    model = load_weights(build_model(cfg.teacher.spec(), data), epoch1).eval()

    def logits(split):
        xs, ys = zip(*(split[i] for i in range(len(split))))
        with torch.no_grad():
            return model(torch.stack(xs)), torch.as_tensor(ys)

    z, y = logits(data.val)
    assert teacher["temperature"] == pytest.approx(fit_temperature(z, y), rel=1e-6)
    z, y = logits(data.test)
    assert teacher["nll"] == pytest.approx(float(F.cross_entropy(z / teacher["temperature"], y)), rel=1e-6)
    assert abs(teacher["nll"] - float(F.cross_entropy(z, y))) > 1e-5  # the temperature changed it
    best = tiny_recipe(tmp_path, **{"teacher.use": "best"})
    assert run_recipe(best, tmp_path / "best")["rows"][0]["use"] == "best"


def test_teacher_use_an_epoch_not_saved_is_one_line(tmp_path):
    cfg = tiny_recipe(tmp_path, **{"teacher.use": 5})
    with pytest.raises(ConfigError, match="teacher.use: epoch 5 is past the teacher's 2 training epochs"):
        run_recipe(cfg, tmp_path / "run")
    # a run resumed after its epoch file was lost
    cfg = tiny_recipe(tmp_path, **{"teacher.use": 2})
    run_recipe(cfg, tmp_path / "old")
    (tmp_path / "old" / "checkpoints" / "teacher" / "epoch2.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"teacher.use: 2 was not saved in .* \(saved: best, final\)"):
        run_recipe(cfg, tmp_path / "old", resume=True)


def test_transfer_set_teaches_through_the_teacher_terms_only(tmp_path):
    cfg = tiny_recipe(
        tmp_path,
        **{
            "data.init_args": {"train_limit": 100},
            "data.transfer": {"name": "digits"},
            "trainer.epochs": 1,
            "trainer.log_every": 1,
        },
    )
    summary = run_recipe(cfg, tmp_path / "run")
    assert [r["name"] for r in summary["rows"]][-1] == "student_kd"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd_train = [r for r in lines if r["stage"] == "student_kd" and r["split"] == "train"]
    assert all(r["ce"] == r["ce"] for r in kd_train)  # no NaN from batches without a label
    scratch_train = [r for r in lines if r["stage"] == "student_scratch" and r["split"] == "train"]
    # 100 labelled images: 2 batches; + 1,078 transfer images: 19 batches, for the distilled student only
    assert len(scratch_train) == 2 and len(kd_train) == 19


def test_transfer_set_of_another_shape_is_one_line(tmp_path):
    cfg = tiny_recipe(
        tmp_path, **{"data.transfer": {"name": "cifar100_standin", "init_args": {"n_train": 8, "n_test": 4}}}
    )
    with pytest.raises(
        ConfigError,
        match=r"data.transfer: its inputs have shape \(3, 32, 32\) but the training data's have \(1, 8, 8\)",
    ):
        run_recipe(cfg, tmp_path / "run")


def test_a_model_scored_by_perplexity_keeps_its_best_checkpoint_by_perplexity(tmp_path):
    from distill.run.hf import resolve_recipe

    def recipe(**trainer):
        data = tiny_recipe(tmp_path, **{"evaluator": {"name": "perplexity"}}).model_dump(mode="json")
        for section in (data["trainer"], data["teacher"]["train"]):  # as a YAML file leaves them out
            del section["monitor"], section["monitor_mode"]
        data["trainer"].update(trainer)
        return resolve_recipe(parse_recipe(data))

    cfg = recipe()
    for tc in (cfg.trainer, cfg.teacher.train):  # teacher.use: best picks by perplexity, lower is better
        assert (tc.monitor, tc.monitor_mode) == ("perplexity", "min")
    assert recipe(monitor="nll").trainer.monitor == "nll"  # what the recipe says wins
