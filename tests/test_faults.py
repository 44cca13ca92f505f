"""Faults and bad input found by the fault run of issue 27 and the new-user run of issue 28: each
test reproduces one finding; each fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError

from distill.checkpoint import load_state, load_weights, save_state
from distill.cli import main as cli
from distill.errors import CheckpointError, ConfigError, DistillError
from distill.run.config import load_yaml, parse_recipe
from distill.run.rundir import RunDir


def test_disk_full_inside_safetensors_is_one_line(tmp_path, monkeypatch):
    """safetensors raises its own error type for a full disk (not OSError): still one line."""
    import distill.checkpoint as ck

    save_state(tmp_path / "last.safetensors", {"w": torch.ones(3)})

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)  # a partial write, then the disk is full
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full while writing .*last.safetensors; free space"):
        save_state(tmp_path / "last.safetensors", {"w": torch.zeros(3)})
    assert load_state(tmp_path / "last.safetensors")["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "a\\b", "..", ""])
def test_recipe_name_is_a_name_not_a_path(name):
    with pytest.raises(ConfigError, match="name: .*path separator|name: .*a name"):
        parse_recipe({"name": name})


def test_recipe_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "g.yaml"
    bad.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_yaml(bad)
    for cmd in (["run", str(bad)], ["check", str(bad)]):
        assert cli(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not UTF-8 text" in err[0], err


def test_out_naming_an_existing_file_is_one_line(tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    with pytest.raises(DistillError, match="is a file, not a folder"):
        RunDir(f, "x: 1\n")
    assert f.read_text() == "mine"


def test_checkpoint_that_is_a_directory_says_so(tmp_path):
    d = tmp_path / "d"
    (d / "checkpoints" / "student_kd").mkdir(parents=True)
    save_state(
        d / "checkpoints" / "student_kd" / "final.safetensors", {"model": {"weight": torch.ones(2, 2)}}
    )
    with pytest.raises(CheckpointError, match="is a folder, not a weights file.*final.safetensors"):
        load_weights(torch.nn.Linear(2, 2, bias=False), d)
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a weights file.*a .safetensors file"):
        load_weights(torch.nn.Linear(2, 2), empty)


# --------------------------------------------------------------------------- bad data


def _csv(path, text):
    path.write_text(text)
    return str(path)


def test_table_reader_fails_fast_on_a_huge_sparse_file(tmp_path):
    """A sparse 64 MiB file of NUL bytes: one line naming the file, at once (the csv module read it
    whole as one field, then raised `field larger than field limit`)."""
    pytest.importorskip("pyarrow", reason="pip install 'distill[tables]'")
    from distill.data.sources import table

    f = tmp_path / "big.csv"
    with open(f, "wb") as fh:
        fh.truncate(64 << 20)
    with pytest.raises(DistillError, match=r"table: .*big\.csv .*CSV"):
        table(str(f))


def test_table_row_with_extra_fields_names_the_file_and_row(tmp_path):
    pytest.importorskip("pyarrow", reason="pip install 'distill[tables]'")
    from distill.data.sources import table

    f = _csv(tmp_path / "t.csv", "a,b,label\n1,2,x\n3,4,y,9\n")
    with pytest.raises(DistillError, match=r"t\.csv.*line 3: Expected 3 columns, got 4"):
        table(f)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("bad", ["1e400", "-inf", "nan"])
def test_non_finite_values_are_named_by_column_and_row_in_every_split(tmp_path, split, bad):
    from distill.data.sources import table

    rows = "".join(f"{i % 7},{i % 3},{'xy'[i % 2]}\n" for i in range(20))
    good = _csv(tmp_path / "good.csv", "a,b,label\n" + rows)
    broken = _csv(tmp_path / "bad.csv", "a,b,label\n" + rows.replace("\n2,2,x\n", f"\n2,{bad},x\n", 1))
    train, val = (broken, good) if split == "train" else (good, broken)
    with pytest.raises(
        DistillError,
        match=rf"bad\.csv column 'b' row 3 holds {bad[-3:]}|bad\.csv column 'b' row 3 holds .*inf",
    ):
        table(train, val_path=val, test_fraction=0.2)


def test_corrupt_image_names_the_file(tmp_path):
    pytest.importorskip("torchvision", reason="pip install 'distill[vision]'")
    from PIL import Image

    from distill.data.sources import image_folder

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / c / f"{i}.png")
    whole = (tmp_path / "img" / "b" / "2.png").read_bytes()
    (tmp_path / "img" / "b" / "2.png").write_bytes(whole[: len(whole) // 2])  # cut: "image file is truncated"
    data = image_folder(str(tmp_path / "img"), image_size=8, augment=False, val_fraction=0, test_fraction=0)
    with pytest.raises(DistillError, match=r"image .*b/2\.png cannot be read"):
        for i in range(len(data.train)):
            data.train[i]


# --------------------------------------------------------------------------- the teacher store


class _Gated(torch.nn.Module):
    """A linear teacher whose first forward waits for `go` (so a second writer starts meanwhile)."""

    def __init__(self, started, go):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.started, self.go = started, go

    def forward(self, x):
        self.started.set()
        assert self.go.wait(30)
        return self.lin(x)


def test_two_writers_of_one_store_the_second_is_refused(tmp_path):
    import threading

    from torch.utils.data import TensorDataset

    from distill.teachers.store import CachedTeacher, write_store

    data = TensorDataset(torch.randn(12, 4), torch.arange(12) % 3)
    started, go = threading.Event(), threading.Event()
    first_error = []

    def first():
        try:
            write_store(_Gated(started, go), data, tmp_path / "S", shard_size=4, log=None)
        except BaseException as e:  # noqa: BLE001 - reported below
            first_error.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    try:
        with pytest.raises(DistillError, match="another process is writing the teacher store"):
            write_store(torch.nn.Linear(4, 3), data, tmp_path / "S", shard_size=4, overwrite=True, log=None)
    finally:
        go.set()
        t.join(60)
    assert not first_error, first_error
    CachedTeacher(tmp_path / "S", dataset=data)  # complete and whole


def test_a_store_with_missing_or_cut_shards_is_refused_in_one_line(tmp_path):
    from torch.utils.data import TensorDataset

    from distill.teachers.store import CachedTeacher, write_store

    data = TensorDataset(torch.randn(12, 4), torch.arange(12) % 3)
    teacher = torch.nn.Linear(4, 3)
    write_store(teacher, data, tmp_path / "S", shard_size=4, log=None)
    shard = tmp_path / "S" / "logits.00001.npy"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-5])
    with pytest.raises(DistillError, match=r"damaged.*logits\.00001\.npy.*cache-teacher .*--overwrite"):
        CachedTeacher(tmp_path / "S")
    with pytest.raises(DistillError, match=r"damaged.*logits\.00001\.npy"):
        write_store(teacher, data, tmp_path / "S", shard_size=4, log=None)
    shard.unlink()
    with pytest.raises(DistillError, match=r"damaged.*1 of 3 shard files missing.*logits\.00001\.npy"):
        CachedTeacher(tmp_path / "S")


# --------------------------------------------------------------------------- distill tune


def test_a_trial_whose_process_died_is_resumed_at_once(tmp_path):
    """A trial left `running` by a killed process on this machine is queued again on the next start,
    without waiting for the heartbeat grace (120 s)."""
    pytest.importorskip("optuna", reason="pip install 'distill[tune]'")
    import os
    import socket
    import subprocess
    import sys

    from optuna.trial import TrialState

    from distill.tune.config import TuneRecipe
    from distill.tune.study import _requeue_interrupted, open_study

    def claim_trial(trial, pid=None):  # what each trial records when it starts (trials.claim_trial)
        trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": pid or os.getpid()})

    cfg = TuneRecipe.model_validate(
        {
            "name": "t",
            "search": {
                "objective.terms.kd.init_args.temperature": {"type": "float", "low": 1.0, "high": 8.0}
            },
        }
    )
    study = open_study(cfg, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its process id now names no process
    trial = study.ask()
    trial.suggest_float("objective.terms.kd.init_args.temperature", 1.0, 8.0)
    claim_trial(trial, pid=dead.pid)
    mine = study.ask()  # a live trial of this process: left alone
    claim_trial(mine)
    assert _requeue_interrupted(study) == [trial.number]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[trial.number] == TrialState.FAIL and states[mine.number] == TrialState.RUNNING
    queued = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert [t.user_attrs["resume_of"] for t in queued] == [trial.number]


def test_tune_help_states_the_heartbeat_grace(capsys):
    with pytest.raises(SystemExit):
        cli(["tune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "120 s" in out and "DISTILL_TUNE_GRACE_S" in out


# --------------------------------------------------------------------------- run folders


def test_overwrite_never_deletes_a_folder_that_distill_did_not_mark(tmp_path):
    f = tmp_path / "someone"
    (f / "src").mkdir(parents=True)
    (f / "config.yaml").write_text("theirs: 1\n")
    (f / "important.txt").write_text("keep me")
    (f / "src" / "main.py").write_text("print(1)\n")
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(DistillError, match="not a distill run folder"):
            RunDir(f, "a: 1\n", **flags)
    assert sorted(p.name for p in f.rglob("*")) == ["config.yaml", "important.txt", "main.py", "src"]


def test_a_folder_that_looks_like_a_failed_run_is_not_reclaimed_without_the_marker(tmp_path):
    f = tmp_path / "looks"
    (f / "tensorboard").mkdir(parents=True)
    (f / "config.yaml").write_text("a: 1\n")
    (f / "metrics.jsonl").write_text("")
    (f / "tensorboard" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="not a distill run folder"):
        RunDir(f, "a: 1\n")
    assert (f / "tensorboard" / "notes.txt").read_text() == "mine"


def test_overwrite_deletes_only_what_distill_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    with RunDir(out, "a: 1\n"):
        (out / "checkpoints" / "student").mkdir(parents=True)
        (out / "checkpoints" / "student" / "final.safetensors").write_bytes(b"x")
        (out / "plot.png").write_bytes(b"png")
        (out / "student_hf").mkdir()
    run_id = (out / ".distill-run").read_text()
    (out / "notes.txt").write_text("the user's own")
    with RunDir(out, "a: 2\n", overwrite=True):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".distill-run", ".lock", "config.yaml", "notes.txt"]
    assert (out / ".distill-run").read_text() != run_id  # a new run
    assert "kept notes.txt" in capsys.readouterr().err


def test_a_run_that_fails_its_checks_leaves_no_run_folder(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nteacher: {name: mlp, init_args: {hidden: [8]}, train: {epochs: 1}}\n"
        "student: {name: mlp, init_args: {hidden: [8]}}\nobjective: {terms: {kd: {name: kdd}}}\n"
    )
    out = tmp_path / "runs" / "r"
    assert cli(["run", str(recipe), "--out", str(out)]) == 2
    assert "unknown loss 'kdd'" in capsys.readouterr().err
    assert not out.exists()
    assert cli(["run", str(recipe), "--out", str(out), "--seeds", "2"]) == 2
    assert not out.exists()


def test_a_run_folder_replays_from_another_directory(tmp_path, monkeypatch, capsys):
    """config.yaml records data paths absolute (and as written, in a comment), so `distill eval RUN`
    works from anywhere; a path that is gone is named."""
    pytest.importorskip("pyarrow", reason="pip install 'distill[tables]'")
    import json

    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    rows = "".join(f"{i % 5},{(i * 3) % 7},{'ab'[i % 2]}\n" for i in range(40))
    (here / "t.csv").write_text("x1,x2,label\n" + rows)
    (here / "r.yaml").write_text(
        "name: t\ndata: {name: table, init_args: {path: t.csv}}\n"
        "teacher: {name: mlp, init_args: {hidden: [8]}, train: {epochs: 1}}\n"
        "student: {name: mlp, init_args: {hidden: [8]}}\ntrainer: {epochs: 1}\n"
        "report: {latency_repeats: 1}\n"
    )
    monkeypatch.chdir(here)
    assert cli(["run", "r.yaml", "--out", "run"]) == 0
    saved = (here / "run" / "config.yaml").read_text()
    assert f"path: {here / 't.csv'}" in saved and "# data.init_args.path: written as 't.csv'" in saved
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli(["eval", str(here / "run")]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    (here / "t.csv").rename(here / "moved.csv")
    assert cli(["eval", str(here / "run")]) == 2
    assert f"{here / 't.csv'} does not exist" in capsys.readouterr().err


def test_a_missing_relative_data_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from distill.data.sources import table

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError, match=rf"table: gone.csv \(relative to {tmp_path}\) does not exist"):
        table("gone.csv")


def test_tables_without_pyarrow_say_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from distill.data.sources import table

    f = _csv(tmp_path / "t.csv", "a,label\n1,x\n")
    for name in ("pyarrow", "pyarrow.csv", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a core install
    with pytest.raises(DistillError, match=r"t\.csv needs pyarrow: pip install 'distill\[tables\]'"):
        table(f)
