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
