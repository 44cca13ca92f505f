"""More faults (docs/reliability.md): `distill cache-teacher` and `distill tune` killed with SIGKILL at
random points of their progress, then run again."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
REPO = Path(__file__).resolve().parents[1]


def _start(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
    )


def _finish(p: subprocess.Popen) -> None:
    assert p.wait() == 0, p.stderr.read()


def _kill_when(p: subprocess.Popen, progress, target: int) -> bool:
    """Polls `progress()` and SIGKILLs `p` once it reaches `target`; False if `p` ended first."""
    while p.poll() is None and progress() < target:
        time.sleep(0.005)
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True


def _temp_files(folder: Path) -> list[Path]:
    return list(folder.parent.rglob(".*.tmp-*")) if folder.parent.exists() else []


# --------------------------------------------------------------------------- cache-teacher


def _read_store(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    manifest = json.loads((path / "manifest.json").read_text())
    n = len(manifest["shards_done"])
    arrays = {
        k: np.concatenate([np.load(path / f"{k}.{s:05d}.npy") for s in range(n)]) for k in manifest["fields"]
    }
    return manifest, arrays


def _assert_same_store(a: Path, b: Path) -> None:
    ma, xa = _read_store(a)
    mb, xb = _read_store(b)
    assert ma == mb  # fingerprint, fields, shards, complete
    assert ma["complete"] and xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), k
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.fixture(scope="module")
def cache_recipe(tmp_path_factory):
    """A digits recipe whose teacher (a small MLP, untrained) has saved weights."""
    from distill.checkpoint import save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.trainer import seed_everything

    d = tmp_path_factory.mktemp("cache")
    teacher = {"name": "mlp", "class_path": None, "init_args": {"hidden": [32]}}
    seed_everything(0)
    model = build_model(teacher, build_data("digits", None, {}, seed=0))
    save_weights(d / "teacher.safetensors", model.state_dict())
    recipe = {
        "name": "cachekill",
        "data": {"name": "digits"},
        "teacher": {"name": "mlp", "init_args": {"hidden": [32]}, "checkpoint": str(d / "teacher.safetensors")},
        "student": {"name": "mlp", "init_args": {"hidden": [16]}},
    }
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    return d / "r.yaml"


def _cache_args(recipe: Path, out: Path, *extra: str) -> list[str]:
    # 1077 training samples in shards of 16: 68 shards of 4 files (top-3 values, indices, lse, a feature)
    return [
        "cache-teacher",
        str(recipe),
        "--out",
        str(out),
        "--shard-size",
        "16",
        "--batch-size",
        "8",
        "--topk",
        "3",
        "--tap",
        "features.1",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_cache_teacher_sigkill_at_random_points_then_rerun_equals_uninterrupted(tmp_path, cache_recipe):
    """Kills `distill cache-teacher` at random amounts of written shard files (mid-shard, mid-file,
    mid-manifest), runs it again each time, and compares the final store with an uninterrupted one."""
    ref = tmp_path / "ref"
    _finish(_start(_cache_args(cache_recipe, ref)))
    total = len(list(ref.glob("*.npy")))
    assert total == 68 * 4

    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"

    def written() -> int:
        return len(list(partial.glob("*.npy*"))) if partial.exists() else 0

    rng = random.Random(0)
    targets = sorted(rng.sample(range(1, total), 8))
    kills = 0
    for target in targets:
        kills += _kill_when(_start(_cache_args(cache_recipe, out)), written, target)
        assert not out.exists() or not (out / "manifest.json").exists()  # never a half store
    _finish(_start(_cache_args(cache_recipe, out)))
    assert kills >= 6, f"only {kills} kills landed"
    _assert_same_store(ref, out)
    assert not partial.exists(), "the partial folder was left behind"
    assert not _temp_files(out), "a temp file was left behind"


_KILL_AT_RENAME = """
import os, shutil, signal, sys
import distill.cache as cache
mode = sys.argv[1]
real_replace, real_rmtree = os.replace, shutil.rmtree

def replace(src, dst):
    final = str(src).endswith(".partial")
    if final and mode == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if final and mode == "after":
        os.kill(os.getpid(), signal.SIGKILL)

def rmtree(path, *a, **k):  # the old store of --overwrite: remove half of it, then die
    files = sorted(os.listdir(path))
    for f in files[: len(files) // 2]:
        os.unlink(os.path.join(path, f))
    if mode == "rmtree":
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *a, **k)

os.replace = replace
cache.shutil = type("S", (), {"rmtree": staticmethod(rmtree)})
from distill.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["before", "after", "rmtree"])
def test_cache_teacher_killed_at_the_final_rename(tmp_path, cache_recipe, mode):
    """A kill just before or after the rename of STORE.partial to STORE (or while --overwrite removes
    the old store) leaves the complete store or a partial one that the same command finishes."""
    ref = tmp_path / "ref"
    _finish(_start(_cache_args(cache_recipe, ref)))
    out = tmp_path / "store"
    extra = []
    if mode == "rmtree":  # an older store at --out, replaced with --overwrite
        _finish(_start(_cache_args(cache_recipe, out)))
        extra = ["--overwrite"]
    p = subprocess.run(
        [sys.executable, "-c", _KILL_AT_RENAME, mode, *_cache_args(cache_recipe, out, *extra)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    partial = tmp_path / "store.partial"
    if mode == "after":
        assert not partial.exists()
        _assert_same_store(ref, out)  # the rename happened: complete
    else:
        assert json.loads((partial / "manifest.json").read_text())["complete"]
        assert not (out / "manifest.json").exists()  # nothing at `out` passes for a store
        from distill.cache import CachedTeacher
        from distill.errors import DistillError

        with pytest.raises(DistillError, match="not a teacher store.*interrupted write"):
            CachedTeacher(out)
    _finish(_start(_cache_args(cache_recipe, out, *extra)))  # the same command again
    _assert_same_store(ref, out)
    assert not partial.exists() and not _temp_files(out)
