"""Transfer sets beside classification: labels of any type, a teacher shared by every seed."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader


class _IntLabels(torch.utils.data.Dataset):
    """Samples as many datasets give them (speech clips): a tensor input and a plain int label."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.full((1, 4), float(i)), i % 3


def test_unlabelled_batches_with_int_labelled_samples():
    from distill.run.pipeline import Unlabelled

    labelled = _IntLabels()
    merged = ConcatDataset([labelled, Unlabelled(_IntLabels(), -100, like=labelled[0])])
    # batch 12 over the 12 samples: labelled and transfer samples in one default collation
    x, y = next(iter(DataLoader(merged, batch_size=12)))
    assert x.shape == (12, 1, 4)
    assert y.tolist() == [0, 1, 2, 0, 1, 2] + [-100] * 6


def test_unlabelled_keeps_tensor_labels_for_tensor_labelled_sets():
    from distill.run.pipeline import Unlabelled

    like = (torch.zeros(1, 4), torch.tensor(2))
    x, y = Unlabelled(_IntLabels(), -1, like=like)[3]
    assert isinstance(y, torch.Tensor) and int(y) == -1 and torch.equal(x, torch.full((1, 4), 3.0))


@pytest.mark.slow
def test_teacher_seeds_first_trains_one_teacher_for_every_seed(tmp_path):
    from distill.run.pipeline import run_seeds
    from helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, **{"teacher.seeds": "first", "teacher.use": "best"})
    run_seeds(cfg, tmp_path / "run", seeds=2)
    first, second = tmp_path / "run" / "seed0", tmp_path / "run" / "seed1"
    assert (first / "checkpoints" / "teacher" / "best.safetensors").is_file()
    assert not (second / "checkpoints" / "teacher").exists()  # no teacher stage in the second seed
    rows = [json.loads((f / "summary.json").read_text())["rows"][0] for f in (first, second)]
    assert rows[0]["name"] == rows[1]["name"] == "teacher"
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # the same weights, measured twice
    lines = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == {"student_scratch", "student_kd"}
    # the students' seeds still differ
    kd = [json.loads((f / "summary.json").read_text())["rows"][-1] for f in (first, second)]
    assert kd[0]["name"] == "student_kd" and kd[0] != kd[1]


def test_teacher_seeds_first_refuses_an_ensemble(tmp_path):
    from distill.errors import ConfigError
    from distill.run.pipeline import teacher_of_first_seed
    from helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, **{"teacher.seeds": "first"})
    cfg = cfg.model_copy(update={"teachers": [cfg.teacher, cfg.teacher]})
    with pytest.raises(ConfigError, match="teachers:"):
        teacher_of_first_seed(cfg, tmp_path)
    with pytest.raises(ConfigError, match="no teacher weights"):
        teacher_of_first_seed(cfg.model_copy(update={"teachers": []}), tmp_path)
