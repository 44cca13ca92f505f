import collections

import pytest
import torch
from torch import nn

from distill.errors import DistillError
from distill.losses import KD, CrossEntropy
from distill.multitask import (
    MultiTaskDataset,
    MultiTaskStudent,
    TaskBatchSampler,
    TaskTeachers,
    evaluate_tasks,
    task_adapter,
    task_loader,
    task_probabilities,
)
from distill.objective import Objective


def _data(n_a=120, n_b=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(n_a, 6, generator=g), torch.randn(n_b, 6, generator=g)
    ya = xa[:, :3].argmax(1)  # task a: 3 classes
    yb = (xb[:, 3] > 0).long()  # task b: 2 classes
    return {
        "a": torch.utils.data.TensorDataset(xa, ya),
        "b": torch.utils.data.TensorDataset(xb, yb),
    }


def test_task_probabilities_follow_size_to_the_tau():
    assert task_probabilities([100, 25], 1.0) == pytest.approx([0.8, 0.2])
    assert task_probabilities([100, 25], 0.0) == pytest.approx([0.5, 0.5])
    assert task_probabilities([100, 25], 0.5) == pytest.approx([10 / 15, 5 / 15])


def test_sampler_draws_single_task_batches_in_proportion():
    ds = MultiTaskDataset(_data(400, 100))
    sampler = TaskBatchSampler(ds, batch_size=10, tau=0.5, seed=0)
    counts = collections.Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            tasks = {ds.locate(i)[0] for i in batch}
            assert len(tasks) == 1 and len(batch) == 10
            counts[tasks.pop()] += 1
    share = counts[0] / (counts[0] + counts[1])
    assert share == pytest.approx(2 / 3, abs=0.04)  # sqrt(400) : sqrt(100) = 2 : 1
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)  # reproducible per epoch
    ev = TaskBatchSampler(ds, 64, shuffle=False)
    assert sorted(i for b in ev for i in b) == list(range(len(ds)))


def test_multitask_student_distills_each_head_from_its_teacher(tmp_path):
    from distill.engine.trainer import Trainer

    torch.manual_seed(0)
    data = _data()
    ds = MultiTaskDataset(data)
    teachers = {"a": nn.Linear(6, 3), "b": nn.Linear(6, 2)}
    tt = TaskTeachers(teachers, ds.names)
    student = MultiTaskStudent(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU()), {"a": nn.Linear(16, 3), "b": nn.Linear(16, 2)}
    )
    obj = Objective({"ce": CrossEntropy(), "kd": KD(2.0)}, {"ce": 0.5, "kd": 0.5})
    loader = task_loader(ds, 16, tau=0.5, seed=0)
    val = task_loader(ds, 64, shuffle=False)
    tr = Trainer(
        student,
        obj,
        loader,
        teacher=tt,
        val_data=val,
        student_adapter=task_adapter(ds.names),
        out_dir=tmp_path,
        epochs=6,
        optimizer={"lr": 0.02},
        progress="off",
        tensorboard=False,
    )
    tr.fit()
    per_task = evaluate_tasks(student, data, tt)
    assert set(per_task) == {"a", "b"}
    for m in per_task.values():
        assert {"accuracy", "nll", "agreement"} <= set(m)
    # Batch of task b through the teacher: task b's teacher answers (2 classes).
    batch = next(iter(task_loader(MultiTaskDataset({"b": data["b"]}), 4)))
    from distill.outputs import as_batch

    out = TaskTeachers({"b": teachers["b"]})(as_batch(batch))
    assert out.logits.shape == (4, 2)
    assert per_task["a"]["accuracy"] > 0.6 and per_task["b"]["accuracy"] > 0.6


def test_multitask_errors_are_clear():
    student = MultiTaskStudent(nn.Identity(), {"a": nn.Linear(6, 3)})
    with pytest.raises(DistillError, match="no head for task 'z'"):
        student(torch.zeros(1, 6), task="z")
    with pytest.raises(DistillError, match="no teacher for task"):
        TaskTeachers({"a": nn.Linear(6, 3)}, ["a", "b"])
    with pytest.raises(DistillError, match="tau"):
        TaskBatchSampler(MultiTaskDataset(_data()), 4, tau=-1)
