"""The run folder: one per run, locked while in use, never silently mixed with another run."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from distill.checkpoint import atomic_write_text
from distill.engine import distributed as dist
from distill.errors import DistillError
from distill.run.config import import_header


class RunDir:
    """Claims `path` for a run with config text `config_yaml`.

    A folder holding another run is refused unless `overwrite` (it is then emptied) or `resume`
    with the same config; a folder where no stage finished anything (only the config and the log of
    a run that failed at once) is reclaimed silently; with `resume` and another config, the stages
    that `reusable(saved_config)` names (e.g. a teacher whose inputs did not change) are kept and the
    rest is emptied; two processes on one folder are refused by an exclusive lock. Under
    `torchrun` only rank 0 checks, claims and writes the folder; the other ranks wait for its
    verdict (and raise the same error if it refuses).
    """

    def __init__(
        self,
        path: str | Path,
        config_yaml: str,
        resume: bool = False,
        overwrite: bool = False,
        reusable: Callable[[dict], list[str]] | None = None,
    ):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._reusable = reusable
        dist.rank_zero_first(lambda: self._claim(config_yaml, resume, overwrite))

    def _claim(self, config_yaml: str, resume: bool, overwrite: bool) -> None:
        saved = self.path / "config.yaml"
        if self.path.exists() and not self.path.is_dir():
            raise DistillError(
                f"{self.path} is a file, not a folder; give --out a folder (new or a run folder)"
            )
        if self.path.exists() and any(self.path.iterdir()):
            if not saved.exists():
                raise DistillError(
                    f"{self.path} exists and is not a distill run folder; choose another --out"
                )
            self._lock()
            if overwrite or not self._holds_results():
                # a run that failed before finishing anything (bad import, bad argument) left only
                # its config and log: the folder is reclaimed without --resume or --overwrite
                for child in self.path.iterdir():
                    if child.name == ".lock":
                        continue
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            elif resume:
                old_config = yaml.safe_load(saved.read_text())
                diff = _first_difference(old_config, yaml.safe_load(config_yaml))
                keep = self._reusable(old_config) if diff and self._reusable is not None else []
                if diff and keep:
                    self._keep_only(keep)
                    print(
                        f"distill: {self.path}: the recipe changed at {diff}; reusing the finished "
                        f"{', '.join(keep)} stage(s), redoing the rest",
                        file=sys.stderr,
                    )
                elif diff:
                    self._unlock()
                    raise DistillError(
                        f"{self.path} holds a different run (config differs at {diff}); "
                        "use another --out, or --overwrite to replace it"
                    )
            else:
                self._unlock()
                raise DistillError(
                    f"{self.path} already holds a run; pass --resume to continue it or "
                    "--overwrite to replace it"
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        self._remove_stale_temp_files()
        atomic_write_text(saved, import_header() + config_yaml)  # eval finds the recipe's modules

    def _keep_only(self, stages: list[str]) -> None:
        """Empties the folder but for `stages`: their checkpoints, TensorBoard files and metrics lines.
        A nested run folder (`seed1/`, holding its own config.yaml) is left to its own claim."""
        for child in self.path.iterdir():
            if child.name in (".lock", "config.yaml") or (child / "config.yaml").is_file():
                continue
            if child.name in ("checkpoints", "tensorboard") and child.is_dir():
                for stage in child.iterdir():
                    if stage.name not in stages:
                        shutil.rmtree(stage) if stage.is_dir() else stage.unlink()
            elif child.name == "metrics.jsonl":
                kept = []
                for line in child.read_text().splitlines():
                    try:
                        if json.loads(line).get("stage") in stages:
                            kept.append(line + "\n")
                    except json.JSONDecodeError:
                        continue
                atomic_write_text(child, "".join(kept))
            else:
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _holds_results(self) -> bool:
        """Whether anything worth keeping is here: a checkpoint, a summary, a store; anything but the
        config, the lock, the metrics log, TensorBoard files and stale temp files."""
        disposable = {"config.yaml", ".lock", "metrics.jsonl"}
        for f in self.path.rglob("*"):
            rel = f.relative_to(self.path)
            if f.is_dir() or rel.parts[0] == "tensorboard" or str(rel) in disposable:
                continue
            if f.name.startswith(".") and ".tmp-" in f.name:
                continue
            return True
        return False

    def _remove_stale_temp_files(self) -> None:
        """A process killed mid-write leaves its temp file (the real file is intact); holding the
        lock, nothing else writes here, so every temp file is stale."""
        for tmp in self.path.rglob(".*.tmp-*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    def _lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DistillError(
                f"another distill process is using {self.path}; wait for it to finish or choose another --out"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self._unlock()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_difference(a, b, prefix: str = "") -> str | None:
    """The first dotted key at which saved config `a` and new config `b` differ. Keys that `a`
    lacks (added by a newer distill with defaults) are not differences, except in free-form
    `init_args`, where an added argument changes what is built."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + ([k for k in b if k not in a] if prefix.endswith("init_args") else [])
        for k in keys:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d:
                return d
        return None
    return None if a == b else (prefix or "(top level)")
