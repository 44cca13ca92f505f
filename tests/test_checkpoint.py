import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from distill import CheckpointError
from distill.checkpoint import (
    atomic_write,
    atomic_write_text,
    load_into,
    load_state,
    load_weights,
    load_weights_file,
    save_state,
    save_weights,
)


def test_state_roundtrip_with_optimizer_and_rng(tmp_path):
    m = nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": m.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "position": {"epoch": 2, "batch": 5},
        "best": None,
        "t": (1, 2.5),
    }
    save_state(tmp_path / "c.safetensors", state)
    back = load_state(tmp_path / "c.safetensors")
    assert back["position"] == {"epoch": 2, "batch": 5} and back["best"] is None and back["t"] == (1, 2.5)
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])  # integer param ids and nested groups survive
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert np.array_equal(back["rng"]["numpy"][1], np.random.get_state()[1])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"a": torch.ones(2)})

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="disk full"):
        atomic_write(path, boom)
    assert torch.equal(load_weights_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"a": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors|not a safetensors|damaged"):
        load_weights_file(path)
    with pytest.raises(CheckpointError):
        load_state(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_payload_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights_file(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_weights_only_torch_file_is_accepted(tmp_path):
    m = nn.Linear(2, 2)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    m2 = load_weights(nn.Linear(2, 2), tmp_path / "m.pt")
    assert torch.equal(m2.weight, m.weight)


def test_other_architecture_names_mismatched_keys(tmp_path):
    save_weights(tmp_path / "w.safetensors", nn.Linear(3, 2).state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatch.*weight \(2, 3\) vs \(4, 3\)"):
        load_weights(nn.Linear(3, 4), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="missing 2"):
        load_into(nn.Sequential(nn.Linear(3, 2)), nn.Linear(3, 2).state_dict())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights_file(tmp_path / "nope.safetensors")


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hi")
    assert (tmp_path / "a" / "b.txt").read_text() == "hi"
