import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distill import KD, CrossEntropy, DistillError, Objective, TrainingDiverged
from distill.engine.trainer import Trainer
from helpers import blobs


def _student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _teacher():
    torch.manual_seed(123)
    t = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    Trainer(t, Objective({"ce": CrossEntropy()}), blobs(), epochs=5, progress="off", batch_size=16).fit()
    return t


def _kd():
    return Objective({"ce": CrossEntropy(), "kd": KD(temperature=2)}, {"ce": 0.5, "kd": 0.5})


def test_training_learns_and_logs(tmp_path):
    teacher = _teacher()
    s = _student()
    tr = Trainer(
        s,
        _kd(),
        blobs(),
        teacher=teacher,
        val_data=blobs(seed=1),
        epochs=4,
        batch_size=8,
        out_dir=tmp_path,
        stage="s",
        progress="off",
        log_every=2,
        tensorboard=False,
    )
    res = tr.fit()
    assert res["accuracy"] > 0.85 and "agreement" in res
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert {"loss", "ce", "kd", "w_kd", "lr"} <= set(train[0]) and train[-1]["loss"] < train[0]["loss"]
    assert sum(r["split"] == "val" for r in lines) == 4  # one evaluation per epoch
    assert (tmp_path / "checkpoints" / "s" / "last.safetensors").exists()
    assert (tmp_path / "checkpoints" / "s" / "best.safetensors").exists()


class Crashing(Dataset):
    """Raises on the n-th read: a process dying mid-epoch."""

    def __init__(self, base, n):
        self.base, self.n, self.reads = base, n, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.n:
            raise RuntimeError("simulated crash")
        return self.base[i]


@pytest.mark.parametrize("precision,accum", [("fp32", 1), ("fp32", 2), ("bf16", 1)])
def test_resume_equals_uninterrupted(tmp_path, precision, accum):
    teacher = _teacher()
    common = dict(
        teacher=teacher,
        val_data=blobs(seed=1),
        epochs=3,
        batch_size=8,
        progress="off",
        precision=precision,
        grad_accum=accum,
        checkpoint_every=2,
        tensorboard=False,
        seed=5,
    )
    ref = _student()
    Trainer(ref, _kd(), blobs(), **common).fit()

    s = _student()
    tr = Trainer(s, _kd(), Crashing(blobs(), 8 + 150), out_dir=tmp_path, **common)  # dies in epoch 2
    with pytest.raises(DistillError, match="simulated crash"):
        tr.fit()
    resumed = _student(seed=99)  # different init: everything must come from the checkpoint
    tr2 = Trainer(resumed, _kd(), blobs(), out_dir=tmp_path, resume=True, **common)
    assert tr2.progress.step > 0 and (tr2.epoch, tr2.batch_in_epoch) != (0, 0)
    tr2.fit()
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    x, y = blobs().tensors
    x = x.clone()
    x[50] = float("nan")
    data = torch.utils.data.TensorDataset(x, y)
    tr = Trainer(
        _student(),
        Objective({"ce": CrossEntropy()}),
        data,
        epochs=2,
        batch_size=8,
        out_dir=tmp_path,
        progress="off",
        checkpoint_every=1,
        tensorboard=False,
    )
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 0, batch \d+ .*NaN/Inf"):
        tr.fit()
    from distill.checkpoint import load_state

    state = load_state(tmp_path / "checkpoints" / "student" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_teacher_student_class_mismatch_fails_before_training():
    with pytest.raises(DistillError, match="teacher has 3 classes but student has 5"):
        Trainer(nn.Linear(8, 5), _kd(), blobs(), teacher=_teacher(), progress="off")


def test_kd_without_teacher_and_empty_data():
    with pytest.raises(DistillError, match="need a teacher"):
        Trainer(_student(), _kd(), blobs(), progress="off")
    with pytest.raises(DistillError, match="empty"):
        Trainer(
            _student(),
            Objective({"ce": CrossEntropy()}),
            torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
            progress="off",
        )


def test_accepts_plain_dataloader_and_clipping_and_fp16():
    loader = DataLoader(blobs(), batch_size=16, shuffle=True)
    tr = Trainer(
        _student(),
        Objective({"ce": CrossEntropy()}),
        loader,
        epochs=2,
        clip_grad_norm=1.0,
        precision="fp16",
        progress="off",
    )
    tr.fit()
    assert tr.progress.step == 12


def test_max_steps_stops_mid_epoch():
    tr = Trainer(
        _student(),
        Objective({"ce": CrossEntropy()}),
        blobs(),
        epochs=5,
        max_steps=7,
        batch_size=16,
        progress="off",
    )
    tr.fit()
    assert tr.progress.step == 7


def test_used_out_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    """Issue 18 bug 5: a second `fit()` into the same out_dir silently mixed two runs."""

    def make(**kw):
        return Trainer(
            _student(),
            Objective({"ce": CrossEntropy()}),
            blobs(),
            epochs=1,
            batch_size=16,
            out_dir=tmp_path,
            progress="off",
            log_every=1,
            tensorboard=False,
            **kw,
        )

    def lines():
        return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    make().fit()
    first = lines()
    with pytest.raises(
        DistillError, match="already holds training stage 'student'.*resume=True.*overwrite=True"
    ):
        make()
    make(overwrite=True).fit()
    assert [r["step"] for r in lines()] == [r["step"] for r in first]  # replaced, not appended
    make(resume=True).fit()  # finished: resume adds nothing
    assert len(lines()) == len(first)
    # another stage in the same folder is not a conflict
    Trainer(
        _student(),
        Objective({"ce": CrossEntropy()}),
        blobs(),
        epochs=1,
        batch_size=16,
        out_dir=tmp_path,
        stage="other",
        progress="off",
        tensorboard=False,
    )
    with pytest.raises(DistillError, match="not both"):
        make(resume=True, overwrite=True)


def test_progress_off_a_terminal_is_a_plain_line_per_epoch(capsys):
    """issue 28.9: a run redirected to a log printed nothing until its final table."""
    tr = Trainer(
        _student(), _kd(), blobs(), teacher=_teacher(), val_data=blobs(seed=1), epochs=3, batch_size=32
    )
    capsys.readouterr()
    tr.fit()  # progress "auto"; pytest's captured stderr is not a terminal
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" step ")[0] for line in lines] == [f"student: epoch {e}/3," for e in (1, 2, 3)]
    assert all("loss=" in line and "accuracy=" in line and line.endswith(" s)") for line in lines)


def test_progress_lines_inside_a_long_epoch(capsys):
    from distill.engine.progress import ProgressBar

    with ProgressBar("teacher", total=3, every_s=0.0) as bar:
        for _ in range(3):
            bar.advance(0.5)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        f"teacher: step {i}/3, loss=0.5000" for i in (1, 2, 3)
    ]
    with ProgressBar("teacher", total=3, enabled="off", every_s=0.0) as bar:
        bar.advance(0.5)
        bar.note({"accuracy": 1.0}, epoch=1, epochs=1)
    assert capsys.readouterr().err == ""
