"""Small shared builders for the test suite."""

import os
import signal
import subprocess
import sys
import time

import torch
from torch.utils.data import TensorDataset

# Subprocess runs of the CLI: one thread and a fixed hash seed, so killed-and-resumed runs can be
# compared bit for bit with uninterrupted ones.
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def skip_without_system_package(fn, *args, **kwargs):
    """Calls `fn`; the error of data that needs a Debian package this machine lacks (espeak-ng,
    fortunes: its message says `apt-get install ...`) becomes a skip whose reason is that command."""
    import pytest

    from distill.errors import DistillError

    try:
        return fn(*args, **kwargs)
    except DistillError as e:
        if "apt-get install" not in str(e):
            raise
        pytest.skip(f"needs a Debian package: {e}")


DEBIAN_FORTUNES = "/usr/share/games/fortunes"
HIDDEN_PACKAGES = ("espeak-ng", "fortunes")  # what hide_debian_packages hides


def debian_hidden() -> set[str]:
    """The Debian packages this test session pretends are absent (DISTILL_TEST_HIDE_DEBIAN=1)."""
    return set(HIDDEN_PACKAGES) if os.environ.get("DISTILL_TEST_HIDE_DEBIAN") == "1" else set()


def hide_debian_packages(monkeypatch) -> None:
    """This process sees a fresh machine: no espeak-ng on PATH, no /usr/share/games/fortunes.

    What the README's test command meets without Debian's packages, wherever they are installed
    (`.ci/run` sets DISTILL_TEST_HIDE_DEBIAN=1 for a step of the suite: conftest.py)."""
    import pathlib
    import shutil

    def hidden(p) -> bool:
        p = os.fspath(p)
        return isinstance(p, str) and (p == DEBIAN_FORTUNES or p.startswith(DEBIAN_FORTUNES + "/"))

    real_stat, real_isdir, real_exists, real_which = (
        pathlib.Path.stat,
        os.path.isdir,
        os.path.exists,
        shutil.which,
    )

    def stat(self, *a, **k):
        if hidden(self):
            raise FileNotFoundError(2, "hidden: a fresh machine has no Debian fortunes", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr(os.path, "isdir", lambda p: not hidden(p) and real_isdir(p))
    monkeypatch.setattr(os.path, "exists", lambda p: not hidden(p) and real_exists(p))
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "espeak-ng" else real_which(name, *a, **k)
    )


def blobs(n: int = 96, classes: int = 3, dim: int = 8, seed: int = 0) -> TensorDataset:
    """Separable Gaussian blobs (fixed centres; `seed` draws the samples): learnt in a few steps."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def tiny_recipe(tmp_path, **over):
    """The digits recipe shrunk to seconds."""
    from distill.run.config import RecipeConfig, apply_overrides, parse_recipe

    data = RecipeConfig().model_dump(mode="json")
    flat = {
        "trainer.epochs": 2,
        "teacher.train.epochs": 2,
        "student.init_args.hidden": [16],
        "teacher.init_args.channels": [8, 16],
        "report.latency_repeats": 2,
        "trainer.tensorboard": False,
        "teacher.train.tensorboard": False,
        **over,
    }
    return parse_recipe(apply_overrides(data, [f"{k}={v}" for k, v in flat.items()]))


def start_cli(args: list[str], env=None) -> subprocess.Popen:
    """`python -m distill ARGS` in the background; its stderr goes to a file (`p.err`), never to
    a pipe nobody reads while it runs (a run off a terminal logs a line per epoch)."""
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - open while the process runs; closed with it
    p = subprocess.Popen(
        [sys.executable, "-m", "distill", *args],
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
        env=env or CLI_ENV,
    )
    p.err = err
    return p


def finish(p: subprocess.Popen) -> None:
    code = p.wait()
    p.err.seek(0)
    assert code == 0, p.err.read()[-4000:]


def kill_when(p: subprocess.Popen, progress, target: int) -> bool:
    """Polls `progress()` and SIGKILLs `p` once it reaches `target`; False if `p` ended first (and
    then it must have succeeded)."""
    while p.poll() is None and progress() < target:
        time.sleep(0.005)
    if p.poll() is not None:
        finish(p)
        return False
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True
