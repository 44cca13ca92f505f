"""Faults and hostile input: each test is a row of docs/reliability.md."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from distill import CheckpointError, ConfigError, CrossEntropy, DistillError, Objective
from distill.checkpoint import load_state, load_weights_file
from distill.engine.trainer import Trainer
from distill.run.config import RecipeConfig, parse_recipe
from distill.run.report import write_report
from distill.run.rundir import RunDir
from helpers import blobs, finish, kill_when, start_cli, tiny_recipe


class BadSample(Dataset):
    def __init__(self, bad: int):
        self.base, self.bad = blobs(), bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError("corrupt image file")
        return self.base[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_sample_is_named_by_index(workers):
    tr = Trainer(
        torch.nn.Linear(8, 3),
        Objective({"ce": CrossEntropy()}),
        BadSample(bad=77),
        batch_size=8,
        num_workers=workers,
        progress="off",
        epochs=1,
    )
    with pytest.raises(
        DistillError,
        match=r"reading sample 77 failed: ValueError: corrupt image file \(in epoch 0, "
        r"batch \d+\)",
    ) as e:
        tr.fit()
    assert "\n" not in str(e.value)


def test_labels_out_of_range_stop_at_first_bad_batch():
    x, y = blobs().tensors
    y = y.clone()
    y[40] = 9
    tr = Trainer(
        torch.nn.Linear(8, 3),
        Objective({"ce": CrossEntropy()}),
        torch.utils.data.TensorDataset(x, y),
        batch_size=8,
        progress="off",
        epochs=1,
    )
    with pytest.raises(DistillError, match="label 9 is out of range for 3 classes"):
        tr.fit()


def test_disk_full_during_checkpoint_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    tr = Trainer(
        torch.nn.Linear(8, 3),
        Objective({"ce": CrossEntropy()}),
        blobs(),
        batch_size=8,
        progress="off",
        epochs=2,
        out_dir=tmp_path,
        checkpoint_every=1,
        tensorboard=False,
    )
    calls = {"n": 0}
    import distill.checkpoint as ck

    real = ck.save_file

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:
            Path(path).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(CheckpointError, match="disk full while writing .*last.safetensors"):
        tr.fit()
    ckdir = tmp_path / "checkpoints" / "student"
    state = load_state(ckdir / "last.safetensors")  # the previous checkpoint is intact
    assert state["position"]["step"] == 4
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.safetensors"]


def test_second_process_on_same_run_folder_is_refused(tmp_path):
    cfg = RecipeConfig().to_yaml()
    with RunDir(tmp_path / "run", cfg):
        code = (
            "import sys\nfrom distill.run.rundir import RunDir\nfrom distill.errors import DistillError\n"
            f"try:\n    RunDir({str(tmp_path / 'run')!r}, open({str(tmp_path / 'run' / 'config.yaml')!r}).read(), "
            "resume=True)\nexcept DistillError as e:\n    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3 and "another distill process is using" in r.stdout
    with RunDir(tmp_path / "run", cfg, resume=True):  # released when the first one finished
        pass


def test_run_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DistillError, match="not a distill run folder"):
        RunDir(tmp_path / "photos", "x: 1\n", overwrite=True)
    assert (tmp_path / "photos" / "a.jpg").exists()


_KEYS = [
    "name",
    "seed",
    "data",
    "data.batch_size",
    "data.name",
    "teacher",
    "teacher.init_args",
    "teacher.train",
    "teacher.train.epochs",
    "student.name",
    "objective",
    "objective.terms",
    "objective.terms.kd",
    "objective.terms.kd.weight",
    "objective.schedules",
    "trainer",
    "trainer.epochs",
    "trainer.precision",
    "trainer.optimizer",
    "trainer.optimizer.lr",
    "trainer.lr_schedule.name",
    "baselines",
    "report",
    "report.latency_batch_sizes",
    "evaluator",
    "teacher.adapter",
]
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_key = st.one_of(
    st.sampled_from(_KEYS),
    st.builds(
        lambda a, b: f"{a}.{b}",
        st.sampled_from(_KEYS),
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_key, _values), min_size=1, max_size=3))
def test_random_recipe_edits_give_a_named_error_or_a_valid_recipe(edits):
    data = RecipeConfig().model_dump(mode="json")
    for key, value in edits:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    try:
        parse_recipe(data)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("recipe: ")
        assert any(k.split(".")[0] in msg for k, _ in edits) or "(top level)" in msg


def test_metrics_file_of_100k_lines_reports_correctly(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 100_001):
            f.write(
                json.dumps(
                    {
                        "stage": "student_kd",
                        "split": "train",
                        "step": step,
                        "epoch": step // 1000,
                        "loss": 1.0 / step,
                    }
                )
                + "\n"
            )
            if step % 1000 == 0:
                f.write(
                    json.dumps(
                        {
                            "stage": "student_kd",
                            "split": "val",
                            "step": step,
                            "epoch": step // 1000,
                            "accuracy": step / 100_000,
                        }
                    )
                    + "\n"
                )
        f.write('{"stage": "student_kd", "split": "tr')  # a line cut by a crash
    rows = [{"name": "student_kd", "accuracy": 1.0, "params": 10, "latency_ms_b64": 1.0}]
    (tmp_path / "summary.json").write_text(json.dumps({"command": "run", "recipe": "x", "rows": rows}))
    write_report(tmp_path)
    assert "| student_kd |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_truncated_checkpoint_in_a_run_is_refused_on_resume(tmp_path):
    tr = Trainer(
        torch.nn.Linear(8, 3),
        Objective({"ce": CrossEntropy()}),
        blobs(),
        batch_size=8,
        progress="off",
        epochs=1,
        out_dir=tmp_path,
        tensorboard=False,
    )
    tr.fit()
    last = tmp_path / "checkpoints" / "student" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a safetensors file|damaged"):
        Trainer(
            torch.nn.Linear(8, 3),
            Objective({"ce": CrossEntropy()}),
            blobs(),
            batch_size=8,
            progress="off",
            epochs=1,
            out_dir=tmp_path,
            resume=True,
        )


def _lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    """Kills `distill run` with SIGKILL at random points of its progress (during steps, evaluation
    and checkpoint writes of every stage), resumes each time, and compares the final weights with
    an uninterrupted run."""
    over = {
        "trainer.checkpoint_every": 1,
        "teacher.train.checkpoint_every": 1,
        "trainer.log_every": 1,
        "teacher.train.log_every": 1,
        "trainer.epochs": 3,
        "teacher.train.epochs": 3,
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path, **over).to_yaml())
    finish(start_cli(["run", str(recipe), "--out", str(tmp_path / "ref")]))
    total = _lines(tmp_path / "ref" / "metrics.jsonl")

    # Kill points: random amounts of progress (metrics lines written), across all three stages.
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    for attempt, target in enumerate(sorted(rng.sample(range(3, total - 3), 6))):
        args = ["run", str(recipe), "--out", str(out)] + (["--resume"] if attempt else [])
        kills += kill_when(start_cli(args), lambda: _lines(out / "metrics.jsonl"), target)
    finish(start_cli(["run", str(recipe), "--out", str(out), "--resume"]))
    assert kills >= 4, f"only {kills} kills landed"
    for stage in ("teacher", "student_scratch", "student_kd"):
        a = load_weights_file(tmp_path / "ref" / "checkpoints" / stage / "final.safetensors")
        b = load_weights_file(out / "checkpoints" / stage / "final.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert not list(out.rglob(".*.tmp-*")), "a temp file was left behind"
