"""The run folder: one per run, locked while in use, never silently mixed with another run."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import yaml

from distill.checkpoint import atomic_write_text
from distill.engine import distributed as dist
from distill.errors import DistillError
from distill.run.config import import_header


class RunDir:
    """Claims `path` for a run with config text `config_yaml`.

    A folder holding another run is refused unless `overwrite` (it is then emptied) or `resume`
    with the same config; two processes on one folder are refused by an exclusive lock. Under
    `torchrun` only rank 0 checks, claims and writes the folder; the other ranks wait for its
    verdict (and raise the same error if it refuses).
    """

    def __init__(self, path: str | Path, config_yaml: str, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self._lock_fd: int | None = None
        dist.rank_zero_first(lambda: self._claim(config_yaml, resume, overwrite))

    def _claim(self, config_yaml: str, resume: bool, overwrite: bool) -> None:
        saved = self.path / "config.yaml"
        if self.path.exists() and any(self.path.iterdir()):
            if not saved.exists():
                raise DistillError(
                    f"{self.path} exists and is not a distill run folder; choose another --out"
                )
            self._lock()
            if overwrite:
                for child in self.path.iterdir():
                    if child.name == ".lock":
                        continue
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            elif resume:
                diff = _first_difference(yaml.safe_load(saved.read_text()), yaml.safe_load(config_yaml))
                if diff:
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
    lacks (added by a newer distill with defaults) are not differences."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d:
                return d
        return None
    return None if a == b else (prefix or "(top level)")
