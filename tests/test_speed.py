"""The Trainer's fast-path options: compile with fallback, cheap NaN guard, label checks."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distill.engine.trainer import Trainer
from distill.errors import DistillError, TrainingDiverged
from distill.losses.logits import KD, CrossEntropy
from distill.objective import Objective


def _data(n=32, bad_label=False, nan_at=None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    if bad_label:
        y[5] = 7
    if nan_at is not None:
        x[nan_at] = float("nan")
    return TensorDataset(x, y)


def _trainer(data, **kw):
    torch.manual_seed(0)
    obj = Objective({"ce": CrossEntropy(), "kd": KD(2.0)}, {"ce": 0.5, "kd": 0.5})
    teacher = nn.Linear(4, 3)
    opts = dict(epochs=1, batch_size=8, device="cpu", progress="off", tensorboard=False, log_every=1)
    opts.update(kw)
    return Trainer(nn.Linear(4, 3), obj, data, teacher=teacher, **opts)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    tr = _trainer(_data(), compile=True)
    with pytest.warns(RuntimeWarning, match="training eagerly"):
        tr.fit()
    assert tr.progress.step == 4
    assert tr.task.student._compiled_call_impl is None


def test_errors_are_not_swallowed_by_the_compile_fallback(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)  # a "compiled" student that works
    tr = _trainer(_data(nan_at=9), compile=True)
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        tr.fit()


def test_nan_guard_names_the_samples():
    tr = _trainer(_data(nan_at=3))
    with pytest.raises(TrainingDiverged, match=r"samples \[3\]|NaN/Inf"):
        tr.fit()


def test_ce_label_check_and_switch():
    with pytest.raises(DistillError, match="label 7 is out of range"):
        _trainer(_data(bad_label=True), batch_size=32)
    ce = CrossEntropy()
    ce.check_labels = False  # what the Trainer does on CUDA, where it checks host-side instead
    assert ce.check_labels is False


@pytest.mark.gpu
def test_cuda_deferred_guard_and_host_label_check():
    tr = _trainer(_data(nan_at=20), device="cuda")
    with pytest.raises(TrainingDiverged):
        tr.fit()
    with pytest.raises(DistillError, match="out of range"):
        t = _trainer(_data(), device="cuda", batch_size=8)
        t.train_loader.dataset.tensors[1][20] = 9
        t.fit()
