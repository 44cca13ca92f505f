"""The run folder: one per run, locked while in use, never silently mixed with another run."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from distill.checkpoint import atomic_write_text, lock_or_refuse, unlock
from distill.engine import distributed as dist
from distill.errors import DistillError
from distill.run.config import import_header

MARKER = ".distill-run"
# What a distill command may leave at the top of a run folder. A run's marker lists what it wrote
# (updated when it closes); these names are distill's as well, for a run killed before that.
DISTILL_NAMES = frozenset(
    {
        MARKER,
        ".lock",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "checkpoints",
        "tensorboard",
        "student_hf",
        "teacher_hf",
        "teacher",
        "teacher.json",
        "teacher.safetensors",
        "onnx",
        "pruned",
        "rows",
        "stages",
        "stages.json",
        "export",
    }
)


class RunDir:
    """Claims `path` for a run with config text `config_yaml`.

    A run folder is one that distill marked as its own (`.distill-run`, holding the run's id and
    what it wrote); any other non-empty folder is refused, even with `overwrite`. A run folder
    holding another run is refused unless `overwrite` (what distill wrote is then deleted; other
    files are kept) or `resume` with the same config; a folder where no stage finished anything
    (only the config and the log of a run killed at once) is reclaimed silently; with `resume` and
    another config, the stages that `reusable(saved_config)` names (e.g. a teacher whose inputs
    did not change) are kept and the rest is emptied; two processes on one folder are refused by
    an exclusive lock. A run that fails before it finished anything (a bad recipe, a failed check)
    removes the folder it made. Under `torchrun` only rank 0 checks, claims and writes the folder;
    the other ranks wait for its verdict (and raise the same error if it refuses).
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
        self._made = False  # this claim found the folder empty (or made it)
        self._created = False  # this claim made the folder
        self._foreign: set[str] = set()  # names in the folder that distill did not write
        dist.rank_zero_first(lambda: self._claim(config_yaml, resume, overwrite))

    def _claim(self, config_yaml: str, resume: bool, overwrite: bool) -> None:
        saved = self.path / "config.yaml"
        if self.path.exists() and not self.path.is_dir():
            raise DistillError(
                f"{self.path} is a file, not a folder; give --out a folder (new or a run folder)"
            )
        if self.path.exists() and any(self.path.iterdir()):
            marker = _read_marker(self.path)
            if marker is None:
                raise DistillError(
                    f"{self.path} exists and is not a distill run folder (no {MARKER} marker); "
                    "nothing in it was changed: choose another --out"
                )
            self._lock()
            self._foreign = {c.name for c in self.path.iterdir() if not _distills(c, marker)}
            if overwrite or not self._holds_results():
                # a run that failed before finishing anything (bad import, bad argument) left only
                # its config and log: the folder is reclaimed without --resume or --overwrite
                for child in self._ours():
                    if child.name != ".lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                if self._foreign:
                    print(
                        f"distill: {self.path}: kept {', '.join(sorted(self._foreign))} (not written by distill)",
                        file=sys.stderr,
                    )
                marker = _new_marker()
            elif resume:
                old_config = yaml.safe_load(saved.read_text()) if saved.exists() else {}
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
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._made = True
            marker = _new_marker()
        self._remove_stale_temp_files()
        atomic_write_text(self.path / MARKER, json.dumps(marker))
        atomic_write_text(saved, import_header() + config_yaml)  # eval finds the recipe's modules

    def _ours(self) -> list[Path]:
        return [c for c in self.path.iterdir() if c.name not in self._foreign]

    def _keep_only(self, stages: list[str]) -> None:
        """Empties the folder but for `stages`: their checkpoints, TensorBoard files and metrics lines.
        A nested run folder (`seed1/`, holding its own config.yaml) is left to its own claim."""
        for child in self._ours():
            if child.name in (".lock", "config.yaml", MARKER) or (child / "config.yaml").is_file():
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
        """Whether anything worth keeping is here: a checkpoint, a summary, a store; anything of
        distill's but the config, the marker, the lock, the metrics log, TensorBoard files and
        stale temp files."""
        disposable = {"config.yaml", ".lock", "metrics.jsonl", MARKER}
        for top in self._ours():
            for f in [top, *top.rglob("*")] if top.is_dir() else [top]:
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
        for top in self._ours():
            for tmp in [top] if top.is_file() else top.rglob(".*.tmp-*"):
                if tmp.is_file() and tmp.name.startswith(".") and ".tmp-" in tmp.name:
                    tmp.unlink(missing_ok=True)

    def _lock(self) -> None:
        self._lock_fd = lock_or_refuse(
            self.path / ".lock",
            f"another distill process is using {self.path}; wait for it to finish or choose another --out",
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            unlock(self._lock_fd)
            self._lock_fd = None

    def _record_written(self) -> None:
        """Lists in the marker what this run wrote: all but what was here before that is not ours."""
        marker = _read_marker(self.path)
        if marker is None:
            return
        marker["written"] = sorted(c.name for c in self._ours())
        atomic_write_text(self.path / MARKER, json.dumps(marker))

    def close(self, failed: bool = False) -> None:
        """Releases the folder. After a failure (not an interrupt) before the run wrote anything but
        its claim (a bad recipe, a failed check), in a folder this claim made, the claim is removed
        too, so no half-made run folder is left behind; a run that logged a step keeps its log."""
        if self._lock_fd is not None:
            claim_only = all(c.name in (".lock", "config.yaml", MARKER) for c in self._ours())
            if failed and self._made and claim_only:
                for child in self._ours():
                    if child.name != ".lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                (self.path / ".lock").unlink(missing_ok=True)
                self._unlock()
                if self._created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()  # only when nothing else is in it
                return
            self._record_written()
        self._unlock()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None and issubclass(exc_type, Exception))


def _new_marker() -> dict:
    return {"run_id": uuid.uuid4().hex, "written": []}


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "run_id" in marker else None


def _distills(child: Path, marker: dict) -> bool:
    """Whether `child` (at the top of a run folder) is distill's: its marker lists it, it is one of
    the names distill writes, a plot, a nested run folder (`seed1/`) or a stale temp file."""
    name = child.name
    if name in DISTILL_NAMES or name in marker.get("written", []) or name.endswith(".png"):
        return True
    if re.fullmatch(r"seed\d+", name):  # the seeds of a --seeds N run
        return True
    if name.startswith(".") and ".tmp-" in name:
        return True
    return child.is_dir() and (_read_marker(child) is not None or (child / "config.yaml").is_file())


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
