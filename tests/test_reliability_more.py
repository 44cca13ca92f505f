"""More faults (docs/reliability.md): `distill cache-teacher` and `distill tune` killed with SIGKILL at
random points of their progress, then run again."""

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import CLI_ENV, finish, kill_when, start_cli

REPO = Path(__file__).resolve().parents[1]


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
    from distill.engine.trainer import seed_everything
    from distill.models.build import build_model

    d = tmp_path_factory.mktemp("cache")
    teacher = {"name": "mlp", "class_path": None, "init_args": {"hidden": [32]}}
    seed_everything(0)
    model = build_model(teacher, build_data("digits", None, {}, seed=0))
    save_weights(d / "teacher.safetensors", model.state_dict())
    recipe = {
        "name": "cachekill",
        "data": {"name": "digits"},
        "teacher": {
            "name": "mlp",
            "init_args": {"hidden": [32]},
            "checkpoint": str(d / "teacher.safetensors"),
        },
        "student": {"name": "mlp", "init_args": {"hidden": [16]}},
    }
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    return d / "r.yaml"


@pytest.fixture(scope="module")
def cache_ref(cache_recipe):
    """The store written by one uninterrupted `distill cache-teacher`."""
    ref = cache_recipe.parent / "ref"
    finish(start_cli(_cache_args(cache_recipe, ref)))
    return ref


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
def test_cache_teacher_sigkill_at_random_points_then_rerun_equals_uninterrupted(
    tmp_path, cache_recipe, cache_ref
):
    """Kills `distill cache-teacher` at random amounts of written shard files (mid-shard, mid-file,
    mid-manifest), runs it again each time, and compares the final store with an uninterrupted one."""
    ref = cache_ref
    total = len(list(ref.glob("*.npy")))
    assert total == 68 * 4

    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"

    def written() -> int:
        return len(list(partial.glob("*.npy*"))) if partial.exists() else 0

    rng = random.Random(0)
    targets = sorted(rng.sample(range(1, total), 6))
    kills = 0
    for target in targets:
        kills += kill_when(start_cli(_cache_args(cache_recipe, out)), written, target)
        if (out / "manifest.json").exists():  # the kill came after the store was whole (a loaded
            _assert_same_store(ref, out)  # machine): whole, never half; start the next try afresh
            shutil.rmtree(out)
    finish(start_cli(_cache_args(cache_recipe, out)))
    assert kills >= 5, f"only {kills} kills landed"
    _assert_same_store(ref, out)
    assert not partial.exists(), "the partial folder was left behind"
    assert not _temp_files(out), "a temp file was left behind"


_KILL_AT_RENAME = """
import os, shutil, signal, sys
import distill.teachers.store as cache
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
def test_cache_teacher_killed_at_the_final_rename(tmp_path, cache_recipe, cache_ref, mode):
    """A kill just before or after the rename of STORE.partial to STORE (or while --overwrite removes
    the old store) leaves the complete store or a partial one that the same command finishes."""
    ref = cache_ref
    out = tmp_path / "store"
    extra = []
    if mode == "rmtree":  # an older store at --out, replaced with --overwrite
        finish(start_cli(_cache_args(cache_recipe, out)))
        extra = ["--overwrite"]
    p = subprocess.run(
        [sys.executable, "-c", _KILL_AT_RENAME, mode, *_cache_args(cache_recipe, out, *extra)],
        env=CLI_ENV,
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
        from distill.errors import DistillError
        from distill.teachers.store import CachedTeacher

        with pytest.raises(DistillError, match="not a teacher store.*interrupted write"):
            CachedTeacher(out)
    finish(start_cli(_cache_args(cache_recipe, out, *extra)))  # the same command again
    _assert_same_store(ref, out)
    assert not partial.exists() and not _temp_files(out)


# --------------------------------------------------------------------------- tune


def _tune_recipe(tmp_path: Path, trials: int) -> Path:
    """recipes/tune_digits.yaml shrunk to seconds: 300 images, a small CNN teacher trained for 2
    epochs, trials of 2-3 epochs (5 steps each), a checkpoint and a metrics line every step."""
    data = yaml.safe_load((REPO / "recipes" / "tune_digits.yaml").read_text())
    data["data"]["init_args"] = {"train_limit": 300}
    data["teacher"]["init_args"]["channels"] = [8, 16]
    data["teacher"]["train"].update(epochs=2, log_every=1, checkpoint_every=1)
    data["student"]["init_args"]["hidden"] = [16]
    data["trainer"].update(log_every=1, checkpoint_every=1)
    data["report"] = {"latency_batch_sizes": [1], "latency_repeats": 2}
    data["search"]["trainer.epochs"] = {"type": "int", "low": 2, "high": 3}
    data["tune"].update(trials=trials, pruner="none")
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _metric_lines(out: Path) -> int:
    n = 0
    for f in [out / "teacher" / "metrics.jsonl", *out.glob("trials/*/metrics.jsonl")]:
        with contextlib.suppress(FileNotFoundError):
            n += f.read_text().count("\n")
    return n


def _trials(out: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="tune_digits", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


@pytest.mark.slow
def test_tune_sigkill_mid_trial_and_mid_study_then_rerun_continues(tmp_path):
    """Kills `distill tune` at random points of its progress (while the shared teacher trains, mid-
    trial, just as a trial finished) and runs it again each time: the study continues in SQLite with
    every earlier trial kept, reaches the requested count, and each killed trial is queued again with
    its values and resumed from its last checkpoint in its folder (its epochs are logged once)."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState

    from distill.checkpoint import load_weights_file

    target = 3
    recipe = _tune_recipe(tmp_path, target)
    out = tmp_path / "study"
    env = {**CLI_ENV, "DISTILL_TUNE_GRACE_S": "2"}
    args = ["tune", str(recipe), "--out", str(out)]

    rng = random.Random(1)
    # progress in metrics lines: the teacher logs 12 (a train line per step, a val line per epoch),
    # each trial 12-18; one kill at a random line of the teacher's training, one as soon as a trial
    # wrote its summary.json (before Optuna recorded it complete), one at a random line of a later trial
    kill_at = [("lines", rng.randrange(3, 12)), ("finished", 0), ("lines", rng.randrange(30, 45))]
    seen: dict[int, dict] = {}  # trial number -> params, from before each restart
    kills = 0
    for kind, t in kill_at:
        p = start_cli(args, env)
        if kind == "lines":
            landed = kill_when(p, lambda: _metric_lines(out), t)
        else:
            n0 = len(list(out.glob("trials/*/summary.json")))
            landed = kill_when(p, lambda n0=n0: len(list(out.glob("trials/*/summary.json"))), n0 + 1)
        if not landed:  # it finished first (kill_when checked that it succeeded)
            continue
        kills += 1
        if (out / "study.db").exists():
            for tr in _trials(out):
                assert seen.get(tr.number, tr.params) == tr.params  # no trial lost or changed
                seen[tr.number] = tr.params
        time.sleep(2.2)  # the killed trial's heartbeat goes stale (DISTILL_TUNE_GRACE_S)
    finish(start_cli(args, env))
    assert kills == 3, f"only {kills} kills landed"

    trials = _trials(out)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert set(seen) <= {t.number for t in trials}  # no trial lost
    for tr in trials:
        assert seen.get(tr.number, tr.params) == tr.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == target
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "no kill landed inside a trial"
    by_first: dict[int, list] = {}
    for t in trials:
        by_first.setdefault(t.user_attrs.get("resume_of", t.number), []).append(t)
    for t in failed:  # each killed try was queued again with its values, and its last try completed
        tries = by_first[t.user_attrs.get("resume_of", t.number)]
        assert tries[-1].state == TrialState.COMPLETE and tries[-1].number > t.number
        assert all(x.params == t.params for x in tries)
        assert tries[-1].user_attrs["run_dir"].endswith(f"trials/{tries[0].number}")
    for first, tries in by_first.items():
        folder = out / "trials" / str(first)
        epochs = tries[-1].params["trainer.epochs"]
        val = [
            json.loads(line)["epoch"]
            for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"split": "val"' in line and '"student_kd"' in line
        ]
        assert val == list(range(1, epochs + 1)), (first, val)  # resumed, not restarted or repeated
    # a resumed trial's weights equal an uninterrupted `distill run` of its recipe
    first = next(k for k, v in by_first.items() if len(v) > 1)
    folder = out / "trials" / str(first)
    finish(start_cli(["run", str(folder / "config.yaml"), "--out", str(tmp_path / "again")]))
    a = load_weights_file(folder / "checkpoints" / "student_kd" / "final.safetensors")
    b = load_weights_file(tmp_path / "again" / "checkpoints" / "student_kd" / "final.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == len(trials) and (out / "best_recipe.yaml").exists()
    assert not list(out.rglob(".*.tmp-*")), "a temp file was left behind"


def _progress(folder: Path) -> int:
    """Files written plus metrics lines: grows through every stage of `distill compress`."""
    if not folder.exists():
        return 0
    files = sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    metrics = folder / "metrics.jsonl"
    return files + (metrics.read_text().count("\n") if metrics.exists() else 0)


@pytest.mark.slow
def test_compress_killed_at_random_stages_then_resumed_matches_uninterrupted(tmp_path):
    """SIGKILL `distill compress` at random points (training, pruning, ONNX export, INT8
    calibration, report), resume each time: every stage's weights and every row's accuracy equal
    an uninterrupted run's."""
    recipe = {
        "name": "tiny",
        "data": {"name": "digits", "init_args": {"train_limit": 200}, "batch_size": 25},
        "teacher": {
            "name": "cnn",
            "init_args": {"channels": [8, 16]},
            "train": {
                "epochs": 2,
                "checkpoint_every": 1,
                "log_every": 1,
                "progress": "off",
                "tensorboard": False,
                "threads": 1,
            },
        },
        "trainer": {
            "epochs": 2,
            "checkpoint_every": 1,
            "log_every": 1,
            "progress": "off",
            "tensorboard": False,
            "threads": 1,
        },
        "baselines": [],
        "compress": {
            "prune": {"ratio": 0.5},
            "quantize": {"calibration_samples": 64, "rows": ["baseline", "pruned_kd"]},
            "bench": {"batch_sizes": [1], "repeats": 2, "warmup": 1},
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def args(out: Path, resume: bool) -> list[str]:
        return ["compress", str(path), "--out", str(out)] + (["--resume"] if resume else [])

    finish(start_cli(args(tmp_path / "ref", False)))
    total = _progress(tmp_path / "ref")

    rng = random.Random(1)
    out = tmp_path / "killed"
    kills = 0
    for attempt, target in enumerate(sorted(rng.sample(range(3, total - 2), 5))):
        kills += kill_when(start_cli(args(out, attempt > 0)), lambda: _progress(out), target)
    finish(start_cli(args(out, True)))
    assert kills >= 3, f"only {kills} kills landed"

    ref_rows = {r["name"]: r for r in json.loads((tmp_path / "ref" / "summary.json").read_text())["rows"]}
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows.keys() == ref_rows.keys()
    for name, r in ref_rows.items():
        assert rows[name]["accuracy"] == r["accuracy"], name
        assert rows[name]["params"] == r["params"], name
    weights = sorted(
        p.relative_to(tmp_path / "ref")
        for p in (tmp_path / "ref").rglob("*.safetensors")
        if "last" not in p.name and "best" not in p.name
    )
    assert weights
    for rel in weights:
        a, b = load_file(str(tmp_path / "ref" / rel)), load_file(str(out / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert not list(out.rglob(".*.tmp-*"))
