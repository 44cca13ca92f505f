"""Offline distillation: run the teacher once over the training data, serve its outputs from disk.

`write_store` writes a *store* (a folder) holding, for every training sample, the teacher's logits
(in full, or only the top-k in float16 with int32 class indices) and optionally tapped features,
as memory-mapped `.npy` shards keyed by sample index. `CachedTeacher` reads it back as the same
`Outputs` a live `Teacher` returns, for batches whose `index` says which samples they hold (wrap
the training set in `distill.data.indexed.IndexedDataset`).

Layout of a store::

    STORE/manifest.json          fingerprint, fields, shard size, shards done
    STORE/logits.00000.npy       (rows, C) float16          full logits, or
    STORE/topk_values.00000.npy  (rows, ..., k) float16     top-k logits
    STORE/topk_indices.00000.npy (rows, ..., k) int32       their class indices
    STORE/lse.00000.npy          (rows, ...) float32        log-sum-exp of the full logits
    STORE/feat.<i>.00000.npy     (rows, ...) float16        tapped feature i

It is written into `STORE.partial/` and renamed to `STORE` when complete, so a reader never sees
a half-written store; an interrupted write resumes from the shards already done. The fingerprint
(teacher weights, dataset length and content of a few samples, the input transform) must match
the teacher and data a run uses, or the store is refused with what differs.

Random augmentation makes a cache wrong (the teacher must see the student's view of each
sample): it is detected and refused, unless `augment_copies=N` asks for N seeded views of every
sample, served through `AugmentedCopies` (a dataset of N·n items whose augmentation is replayed
exactly from its index).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write, atomic_write_text, exclusive_lock
from distill.data.indexed import IndexedDataset
from distill.errors import DistillError
from distill.outputs import Batch, Outputs, as_batch
from distill.teachers.frozen import Teacher

STORE_VERSION = 1
FULL_LOGITS_UP_TO = 1000  # "auto" top-k keeps every logit up to this many classes (ImageNet fits)
AUTO_TOPK = 100
_HASH_SAMPLES = 4


# --------------------------------------------------------------------------- fingerprints


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_hash(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def _hash_item(h, item: Any) -> None:
    if isinstance(item, Tensor):
        h.update(f"{item.dtype}{tuple(item.shape)}".encode())
        h.update(_tensor_bytes(item))
    elif isinstance(item, np.ndarray):
        _hash_item(h, torch.from_numpy(np.ascontiguousarray(item)))
    elif isinstance(item, dict):
        for k in sorted(item):
            h.update(str(k).encode())
            _hash_item(h, item[k])
    elif isinstance(item, list | tuple):
        for v in item:
            _hash_item(h, v)
    else:
        h.update(repr(item).encode())


@contextmanager
def _seeded(seed: int):
    """Runs a block with torch/numpy/python RNGs seeded, restoring the caller's states after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _probe_indices(n: int) -> list[int]:
    return sorted({0, n // 3, (2 * n) // 3, n - 1})[:_HASH_SAMPLES]


def transform_repr(dataset: Any) -> str:
    """The repr of the input transform(s) found on a dataset or the datasets it wraps (memory
    addresses, as in a lambda's repr, are dropped so the same code gives the same text)."""
    parts, ds = [], dataset
    for _ in range(8):  # follow .dataset through wrappers (Subset, IndexedDataset, ...)
        attrs = getattr(ds, "__dict__", None)
        if attrs is None:
            break
        for name in ("transform", "transforms", "target_transform"):
            if attrs.get(name) is not None:
                parts.append(f"{name}={re.sub(r' at 0x[0-9a-fA-F]+', '', repr(attrs[name]))}")
        ds = attrs.get("dataset")
    return "; ".join(parts) or "none"


def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """Length, class name, transform repr and a hash of a few samples (read under a fixed seed,
    so a randomly augmented dataset still hashes the same way every time)."""
    n = len(dataset)
    if n == 0:
        raise DistillError("the dataset to cache is empty")
    h = hashlib.sha256()
    with _seeded(0):
        for i in _probe_indices(n):
            _hash_item(h, dataset[i])
    return {
        "dataset_length": n,
        "dataset_type": type(dataset).__qualname__,
        "dataset_samples": h.hexdigest()[:16],
        "transform": transform_repr(dataset),
    }


def outputs_fingerprint(
    adapter: dict[str, Any] | None, temperature: float | None = None, calibrated: bool | None = None
) -> dict[str, Any]:
    """How the teacher's outputs are made from its weights, for the store's fingerprint: the
    recipe's adapter (`teacher.adapter` as a spec; None or `auto`: the automatic one) and the
    calibration (`teacher.calibrate`: the fitted temperature, to 4 decimals). Give `calibrated`
    without `temperature` to compare only whether the store is calibrated (before it is fitted)."""
    spec = {k: v for k, v in (adapter or {}).items() if v not in (None, {})}
    if spec in ({}, {"name": "auto"}):
        spec = None
    if calibrated is not None:  # before the temperature is fitted: whether there is one
        return {"teacher_adapter": spec, "teacher_calibrated": bool(calibrated)}
    return {
        "teacher_adapter": spec,
        "teacher_calibrated": temperature is not None,
        "teacher_temperature": None if temperature is None else round(float(temperature), 4),
    }


# What a store written before these keys existed was: the automatic adapter, not calibrated.
_OUTPUTS_DEFAULT = {"teacher_adapter": None, "teacher_calibrated": False, "teacher_temperature": None}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def is_random(dataset: Any, seeded: Callable[[int], Any] | None = None) -> bool:
    """True when reading the same sample twice gives different values (random augmentation)."""
    n = len(dataset)
    for i in _probe_indices(n):
        if seeded is not None:
            a, b = seeded(i), seeded(i)
        else:
            with torch.random.fork_rng(devices=[]):
                a, b = dataset[i], dataset[i]
        if not _same(a, b):
            return True
    return False


# --------------------------------------------------------------------------- augmentation


class AugmentedCopies(Dataset):
    """`copies` reproducible augmented views of every sample of `dataset`.

    Item `r` (0 <= r < copies * n) is view `r // n` of sample `r % n`, read with the RNGs seeded
    from `(seed, r)`, so the same item is the same tensor every time it is read, in any worker, and
    the teacher store written over it matches what the student is trained on. Items are
    `(x, y, r)`: `r` is the store key. An epoch over this dataset sees every view of every sample.
    """

    def __init__(self, dataset: Any, copies: int, seed: int = 0):
        if copies < 1:
            raise DistillError(f"augment_copies must be at least 1, got {copies}")
        self.dataset, self.copies, self.seed = dataset, copies, seed
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.copies * self.n

    def read(self, r: int) -> Any:
        with _seeded(self.seed * 1_000_003 + r):
            return self.dataset[r % self.n]

    def __getitem__(self, r: int) -> Any:
        item = self.read(r)
        if isinstance(item, tuple | list) and len(item) == 2:
            return item[0], item[1], r
        if isinstance(item, dict):
            return {**item, "index": r}
        return {"inputs": item, "index": r}


# --------------------------------------------------------------------------- store manifest


@dataclass
class StoreInfo:
    path: Path
    rows: int
    bytes_total: int
    fields: dict[str, Any]

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_total / max(self.rows, 1)

    def describe(self) -> str:
        return (
            f"teacher store {self.path}: {self.rows} entries, {_human(self.bytes_per_sample)} per sample, "
            f"{_human(self.bytes_total)} in total ({', '.join(self.fields)})"
        )


def _human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return f"{b:.1f} GiB"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    f = path / "manifest.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{f} is corrupt ({e}); delete {path} and write the store again") from None


def _differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    names = {
        "teacher_weights": "teacher weights",
        "dataset_length": "dataset length",
        "dataset_type": "dataset type",
        "dataset_samples": "dataset content (hash of a few samples)",
        "transform": "input transform",
        "augment_copies": "augment_copies",
        "augment_seed": "augmentation seed",
        "teacher_adapter": "teacher adapter (teacher.adapter)",
        "teacher_calibrated": "teacher calibrated (teacher.calibrate)",
        "teacher_temperature": "teacher temperature (teacher.calibrate)",
    }
    out = []
    for k, label in names.items():
        if k in given and k in stored and given[k] != stored[k]:
            out.append(f"{label}: store has {stored[k]!r}, this run has {given[k]!r}")
    return out


def _shard_file(path: Path, field: str, shard: int) -> Path:
    return path / f"{field}.{shard:05d}.npy"


def _open_shards(path: Path, manifest: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """Memory-maps every shard file the manifest lists, checking that each is there with the rows,
    shape and dtype the manifest says: a store missing files (two writers, a copy cut short) is
    refused in one line instead of failing mid-training."""
    rows, size = manifest["rows"], manifest["shard_size"]
    n_shards = math.ceil(rows / size)
    fields = manifest["fields"]
    files = [(k, s) for s in range(n_shards) for k in fields]
    missing = [_shard_file(path, k, s).name for k, s in files if not _shard_file(path, k, s).is_file()]
    redo = f"write it again with `distill cache-teacher RECIPE --out {path} --overwrite`"
    if missing:
        raise DistillError(
            f"the teacher store {path} is damaged: {len(missing)} of {len(files)} shard files missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {redo}"
        )
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in fields}
    for k, s in files:
        f = _shard_file(path, k, s)
        want = (min(size, rows - s * size), *fields[k]["shape"])
        try:
            a = np.load(f, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise DistillError(
                f"the teacher store {path} is damaged: {f.name} is cut short or corrupt ({e}); {redo}"
            ) from None
        if a.shape != want or str(a.dtype) != fields[k]["dtype"]:
            raise DistillError(
                f"the teacher store {path} is damaged: {f.name} holds {a.dtype}{list(a.shape)}, the manifest "
                f"says {fields[k]['dtype']}{list(want)}; {redo}"
            )
        arrays[k].append(a)
    return arrays


@contextmanager
def store_lock(path: Path):
    """Holds an exclusive lock on the store `path` (the file `PATH.lock` beside it: the store folder
    itself is renamed into place) while it is written: a second writer is refused at once, as a
    second process on a run folder is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    busy = (
        f"another process is writing the teacher store {path}; wait for it to finish, or choose another --out"
    )
    with exclusive_lock(path.with_name(path.name + ".lock"), busy):
        yield


def _holding_store_lock(fn):
    """Runs a store writer `fn(..., path, ...)` under `store_lock(path)`."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with store_lock(Path(sig.bind(*args, **kwargs).arguments["path"])):
            return fn(*args, **kwargs)

    return locked


# --------------------------------------------------------------------------- writing


def _resolve_topk(topk: int | str | None, classes: int) -> int | None:
    if topk == "auto":
        return None if classes <= FULL_LOGITS_UP_TO else AUTO_TOPK
    if topk is None:
        return None
    if not isinstance(topk, int) or topk < 1:
        raise DistillError(f"topk must be a positive integer, 'auto' or None (full logits), got {topk!r}")
    return None if topk >= classes else topk


def _encode(out: Outputs, topk: int | None, taps: Sequence[str], dtype: np.dtype) -> dict[str, np.ndarray]:
    logits = out.require_logits("teacher").float()
    arrays: dict[str, np.ndarray] = {}
    if topk is None:
        arrays["logits"] = logits.cpu().numpy().astype(dtype)
    else:
        vals, idx = logits.topk(topk, dim=-1)  # sorted, largest first
        arrays["topk_values"] = vals.cpu().numpy().astype(dtype)
        arrays["topk_indices"] = idx.to(torch.int32).cpu().numpy()
        arrays["lse"] = torch.logsumexp(logits, dim=-1).cpu().numpy().astype(np.float32)
    for i, p in enumerate(taps):
        arrays[f"feat.{i}"] = out.feature(p, "teacher").float().cpu().numpy().astype(dtype)
    return arrays


def _ragged_tokens(dataset: Any) -> int | None:
    """For token data whose items differ in length (chat answers), the longest item: the store
    keeps every sample's outputs padded to that length and serves each batch its own width. None
    for anything else (fixed-size inputs, packed blocks)."""
    try:
        first = dataset[0]
    except Exception:  # noqa: BLE001 - a dataset that cannot say is not token data
        return None
    if not isinstance(first, dict) or "input_ids" not in first:
        return None
    lengths = {len(dataset[i]["input_ids"]) for i in range(len(dataset))}
    return max(lengths) if len(lengths) > 1 else None


@_holding_store_lock
def write_store(
    teacher: Teacher | nn.Module,
    dataset: Any,
    path: str | Path,
    topk: int | str | None = "auto",
    taps: Iterable[str] = (),
    batch_size: int = 256,
    shard_size: int = 8192,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    augment_copies: int | None = None,
    augment_seed: int = 0,
    adapter: Adapter | None = None,
    outputs: dict[str, Any] | None = None,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    overwrite: bool = False,
    max_shards: int | None = None,
    log: Callable[[str], None] | None = print,
) -> StoreInfo:
    """Runs `teacher` over `dataset` once and writes its outputs to the store `path`.

    Args:
        teacher: a `Teacher` or a model (wrapped in a `Teacher`, eval mode, inference_mode).
        dataset: the *training* dataset, unwrapped (items `(x, y)`, dicts or tensors); samples
            are keyed by their index in it.
        topk: keep only the k largest logits per sample (float16) with their int32 indices and
            the full log-sum-exp; None keeps every logit; "auto" keeps every logit up to
            1,000 classes and the top 100 beyond.
        taps: teacher module paths whose outputs are stored too (for feature losses).
        shard_size: samples per shard file; a shard is the unit of resumption.
        dtype: "float16" (default) or "float32" for stored logits and features.
        augment_copies: when the dataset augments randomly, store this many seeded views of each
            sample (train on `AugmentedCopies(dataset, augment_copies, augment_seed)`).
        outputs: how the teacher's outputs are made beyond its weights (`outputs_fingerprint`:
            its adapter and calibration), part of the fingerprint; None: the automatic adapter,
            uncalibrated.
        overwrite: replace a complete store at `path` (or an unrelated partial one).
        max_shards: stop after this many new shards (the store stays partial; call again to go on).
        log: where progress and the size report go (None: silent).

    Returns:
        A `StoreInfo` (entries, bytes per sample and in total); the store is complete unless
        `max_shards` stopped it early (then `info.rows` counts the entries written so far).
    """
    path = Path(path)
    say = log or (lambda _m: None)
    if dtype not in ("float16", "float32"):
        raise DistillError(f"dtype: '{dtype}' is not one of float16, float32")
    if not isinstance(teacher, Teacher):
        teacher = Teacher(teacher, adapter or auto_adapter)
    elif adapter is not None:
        raise DistillError("give the adapter to the Teacher, not to write_store, when passing a Teacher")
    taps = list(dict.fromkeys(taps))
    teacher.add_taps(taps)
    if device is not None:
        teacher.to(device)
    dev = teacher.device

    fp: dict[str, Any] = {
        "teacher_weights": weights_hash(teacher.model),
        **dataset_fingerprint(dataset),
        **(outputs or outputs_fingerprint(None)),
    }
    if augment_copies is None:
        if is_random(dataset):
            raise DistillError(
                "the dataset gives a different tensor each time the same sample is read (random "
                "augmentation): cached teacher outputs would not match the student's view; cache the "
                "un-augmented dataset, or pass augment_copies=N (--augment-copies N) to store N seeded "
                "views of each sample and train on AugmentedCopies"
            )
        source: Any = IndexedDataset(dataset)
    else:
        source = AugmentedCopies(dataset, augment_copies, augment_seed)
        if is_random(dataset, seeded=source.read):
            raise DistillError(
                "the dataset's augmentation is random even with torch, numpy and python RNGs seeded "
                "per sample, so its views cannot be replayed; make the transform draw from those RNGs"
            )
        fp.update(augment_copies=augment_copies, augment_seed=augment_seed)
    rows = len(source)
    n_shards = math.ceil(rows / shard_size)
    seq_len = _ragged_tokens(dataset)

    done_manifest = _read_manifest(path) if path.exists() else None
    if done_manifest is not None and not overwrite:
        diff = _differences({**_OUTPUTS_DEFAULT, **done_manifest["fingerprint"]}, fp)
        if done_manifest.get("complete") and not diff:
            _open_shards(path, done_manifest)  # whole, or say to write it again
            info = store_info(path, done_manifest)
            say(f"{info.describe()} (already complete)")
            return info
        raise DistillError(
            f"{path} already holds a teacher store"
            + (f" for other inputs ({'; '.join(diff)})" if diff else "")
            + "; pass overwrite=True (--overwrite) to replace it, or choose another path"
        )
    if path.exists() and done_manifest is None and any(path.iterdir()) and not overwrite:
        raise DistillError(f"{path} exists and is not a teacher store; choose another path")

    partial = path.with_name(path.name + ".partial")
    manifest = _read_manifest(partial) if partial.exists() else None
    if manifest is not None:
        diff = _differences({**_OUTPUTS_DEFAULT, **manifest["fingerprint"]}, fp)
        same_params = (
            manifest["params"]["topk_request"] == (topk if topk != "auto" else "auto")
            and manifest["params"]["taps"] == taps
            and manifest["shard_size"] == shard_size
            and manifest["params"]["dtype"] == dtype
        )
        if diff or not same_params:
            if not overwrite:
                why = "; ".join(diff) if diff else "other topk/taps/shard_size/dtype"
                raise DistillError(
                    f"{partial} is an interrupted store for other inputs ({why}); "
                    "pass overwrite=True (--overwrite) to start again"
                )
            shutil.rmtree(partial)
            manifest = None
        else:
            say(f"resuming {partial}: {len(manifest['shards_done'])} of {n_shards} shards already written")
    if partial.exists():
        _remove_stale_temp_files(partial)
    if manifest is None:
        partial.mkdir(parents=True, exist_ok=True)
        manifest = {
            "version": STORE_VERSION,
            "fingerprint": fp,
            "rows": rows,
            "shard_size": shard_size,
            "params": {"topk_request": topk, "taps": taps, "dtype": dtype},
            "topk": None,
            "classes": None,
            "taps": taps,
            "fields": {},
            "shards_done": [],
            "complete": False,
            "seq_len": seq_len,
        }
        atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=1))

    np_dtype = np.dtype(dtype)
    new = 0
    t0 = time.perf_counter()
    for shard in range(n_shards):
        if shard in manifest["shards_done"]:
            continue
        if max_shards is not None and new >= max_shards:
            say(f"stopped after {new} new shard(s); call again to continue {partial}")
            return store_info(partial, manifest)
        start, end = shard * shard_size, min((shard + 1) * shard_size, rows)
        loader = DataLoader(
            Subset(source, range(start, end)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=dev.type == "cuda",
        )
        chunks: dict[str, list[np.ndarray]] = {}
        for raw in loader:
            batch = as_batch(raw).to(dev, non_blocking=True)
            out = teacher(batch)
            if manifest["classes"] is None:
                classes = out.require_logits("teacher").shape[-1]
                manifest["classes"] = classes
                manifest["topk"] = _resolve_topk(topk, classes)
            for k, v in _encode(out, manifest["topk"], taps, np_dtype).items():
                if seq_len is not None:  # token outputs (B, T, ...) padded to one length T
                    v = np.pad(v, [(0, 0), (0, seq_len - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
                chunks.setdefault(k, []).append(v)
        for k, parts in chunks.items():
            arr = np.concatenate(parts)
            if arr.shape[0] != end - start:
                raise DistillError(
                    f"the teacher returned {arr.shape[0]} rows for {end - start} samples; the adapter "
                    "must return one output per sample"
                )
            atomic_write(_shard_file(partial, k, shard), lambda tmp, a=arr: _save_npy(tmp, a))
            manifest["fields"][k] = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:])}
        manifest["shards_done"] = sorted(manifest["shards_done"] + [shard])
        atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=1))
        new += 1
        rate = (end - start) * new / max(time.perf_counter() - t0, 1e-9)
        say(f"shard {shard + 1}/{n_shards} written ({rate:,.0f} samples/s)")

    manifest["complete"] = True
    atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=1))
    if path.exists():  # only reached with overwrite=True
        # The manifest goes first: a kill during the removal leaves a folder that is no longer
        # taken for a complete store (the complete partial one is renamed on the next call).
        (path / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(path)
    os.replace(partial, path)
    info = store_info(path, manifest)
    say(info.describe())
    return info


def _remove_stale_temp_files(folder: Path) -> None:
    """Removes the temp files (`.NAME.tmp-PID`) that a writer killed mid-write left behind (the
    real files are intact); a temp file of a process still running is left alone."""
    for tmp in folder.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            pass  # not one of ours: a stray name; removed below
        except ProcessLookupError:
            pass  # its writer is gone
        except PermissionError:
            continue  # the process exists (another user's)
        else:
            if pid != os.getpid():
                continue  # a live writer
        tmp.unlink(missing_ok=True)


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, arr)


def store_info(path: str | Path, manifest: dict[str, Any] | None = None) -> StoreInfo:
    """Entries and bytes of a (complete or partial) store."""
    path = Path(path)
    manifest = manifest or _read_manifest(path)
    if manifest is None:
        raise DistillError(f"{path} is not a teacher store (no manifest.json); write one with cache-teacher")
    total, rows = 0, 0
    for shard in manifest["shards_done"]:
        for k in manifest["fields"]:
            f = _shard_file(path, k, shard)
            if f.exists():
                total += f.stat().st_size
        rows += min(manifest["shard_size"], manifest["rows"] - shard * manifest["shard_size"])
    return StoreInfo(path, rows, total, dict(manifest["fields"]))


# --------------------------------------------------------------------------- reading


FILLS = ("tail", "min", "renorm", "bucket")


def reconstruct_logits(
    values: Tensor, indices: Tensor, classes: int, lse: Tensor | None = None, fill: str = "tail"
) -> Tensor:
    """Dense (..., C) logits from the top-k a store kept.

    Args:
        values: (..., k) the k largest logits. indices: (..., k) their classes.
        lse: (...) log-sum-exp of the full logits (needed for `fill="tail"`).
        fill: what the C-k missing logits become:
            "tail": one value chosen so that softmax at T=1 gives the top-k classes their exact
                probabilities and the rest share the exact remaining mass evenly;
            "min": the smallest kept logit (over-states the tail);
            "renorm": a value 1e4 below it, so softmax renormalises over the top-k support alone
                (the "sparse KD" form; the tail gets no mass).

    Returns:
        (..., C) float32 logits; the kept classes hold their stored values.
    """
    values = values.float()
    k = values.shape[-1]
    low = values.min(-1, keepdim=True).values
    if fill == "min":
        rest = low
    elif fill == "renorm":
        rest = low - 1e4
    elif fill == "tail":
        if lse is None:
            raise DistillError("fill='tail' needs the stored log-sum-exp (lse)")
        lse = lse.float().unsqueeze(-1)
        kept = torch.logsumexp(values, -1, keepdim=True)
        # tail mass m = 1 - exp(kept - lse); each of the C-k others gets logit lse + log(m / (C-k))
        tail = -torch.expm1(kept - lse).clamp_max(-1e-30)
        mass = tail.clamp_min(1e-30)
        rest = lse + torch.log(mass / max(classes - k, 1))
        rest = torch.minimum(rest, low)  # float16 rounding must not lift the tail above a kept logit
    else:
        raise DistillError(f"fill: '{fill}' is not one of tail, min, renorm")
    out = rest.expand(*values.shape[:-1], classes).clone()
    out.scatter_(-1, indices.long(), values)
    return out


def check_store(
    path: str | Path,
    dataset: Any = None,
    teacher: Teacher | nn.Module | None = None,
    outputs: dict[str, Any] | None = None,
    augment_copies: int | None = None,
    augment_seed: int = 0,
) -> dict[str, Any]:
    """The manifest of the complete store at `path`, refused (one line naming what differs) when
    it does not match what is given: the training dataset, the teacher's weights, how its outputs
    are made (`outputs_fingerprint`), the augmented views. What is not given is not compared."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        partial = path.with_name(path.name + ".partial")
        hint = (
            f"; {partial} holds an interrupted write: run cache-teacher again to finish it"
            if partial.exists()
            else "; write it with `distill cache-teacher RECIPE.yaml --out PATH`"
        )
        raise DistillError(f"{path} is not a teacher store{hint}")
    if not manifest.get("complete"):
        raise DistillError(f"{path} is incomplete; run cache-teacher again to finish it")
    if manifest.get("version") != STORE_VERSION:
        raise DistillError(f"{path} is a version {manifest.get('version')} store; write it again")
    given: dict[str, Any] = dict(outputs or {})
    if teacher is not None:
        model = teacher.model if isinstance(teacher, Teacher) else teacher
        given["teacher_weights"] = weights_hash(model)
    if isinstance(dataset, AugmentedCopies):
        dataset, augment_copies, augment_seed = dataset.dataset, dataset.copies, dataset.seed
    elif isinstance(dataset, IndexedDataset):
        dataset = dataset.dataset
    if dataset is not None:
        given.update(dataset_fingerprint(dataset))
    stored = {"augment_copies": None, "augment_seed": None, **_OUTPUTS_DEFAULT, **manifest["fingerprint"]}
    if augment_copies is not None:  # the caller says which views it trains on: they must match
        given.update(augment_copies=augment_copies, augment_seed=augment_seed)
    diff = _differences(stored, given)
    if diff:
        raise DistillError(
            f"the teacher store {path} does not match this run ({'; '.join(diff)}); write it "
            "again with cache-teacher for this teacher and data"
        )
    return manifest


class CachedTeacher:
    """Serves a teacher's `Outputs` from a store instead of running it.

    Args:
        path: a store written by `write_store` / `distill cache-teacher`.
        dataset: the training dataset the run uses (unwrapped); its fingerprint must match the
            store's. Strongly recommended: without it nothing checks that the data is the same.
        teacher: the teacher model (or `Teacher`) the run would use; its weights must match.
        fallback: a `Teacher` for batches without sample indices (validation, test), which the
            store does not cover. Without one such batches are an error.
        fill: how top-k stores fill the missing logits (see `reconstruct_logits`), or "bucket":
            no dense logits, the top-k, their ids and the log-sum-exp served as they are, for the
            `fkl` term's top-k + tail-bucket KL (`topk_forward_kl` with `lse`).
        outputs: how the run's teacher makes its outputs (`outputs_fingerprint`: adapter and
            calibration); they must match the store's. None: not checked.
        device: where served tensors go (default: the device of each batch's index).
    """

    def __init__(
        self,
        path: str | Path,
        dataset: Any = None,
        teacher: Teacher | nn.Module | None = None,
        fallback: Teacher | nn.Module | None = None,
        fill: str = "tail",
        augment_copies: int | None = None,
        augment_seed: int = 0,
        outputs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        manifest = check_store(
            self.path, dataset, teacher, outputs, augment_copies=augment_copies, augment_seed=augment_seed
        )
        self.manifest = manifest
        if fill not in FILLS:
            raise DistillError(f"fill: '{fill}' is not one of {', '.join(FILLS)}")
        self.fill = fill
        self.rows = manifest["rows"]
        self.shard_size = manifest["shard_size"]
        self.classes = manifest["classes"]
        self.topk = manifest["topk"]
        self.taps = list(manifest["taps"])
        self.fallback = Teacher(fallback) if isinstance(fallback, nn.Module) else fallback
        # mmap: opening maps the files; pages are read only when rows are gathered.
        self._arrays = _open_shards(self.path, manifest)
        self._device: torch.device | None = None

    def training_dataset(self, dataset: Any) -> Dataset:
        """`dataset` (the one the store was written from) as the student must see it: with sample
        indices, and, for a store of augmented copies, as those same seeded views."""
        if isinstance(dataset, IndexedDataset | AugmentedCopies):
            return dataset
        copies = self.manifest["fingerprint"].get("augment_copies")
        if copies:
            return AugmentedCopies(dataset, copies, self.manifest["fingerprint"].get("augment_seed", 0))
        return IndexedDataset(dataset)

    # The Trainer treats a teacher as: callable on a Batch, `.to(device)`, `.add_taps(paths)`.
    @property
    def device(self) -> torch.device:
        return self._device or torch.device("cpu")

    def to(self, device) -> CachedTeacher:
        self._device = torch.device(device)
        if self.fallback is not None:
            self.fallback.to(device)
        return self

    def add_taps(self, paths: Iterable[str]) -> None:
        missing = [p for p in paths if p not in self.taps]
        if missing:
            raise DistillError(
                f"the teacher store {self.path} has no features for {missing} (stored: {self.taps or 'none'}); "
                "write it again with --tap " + " --tap ".join(missing)
            )
        if self.fallback is not None:
            self.fallback.add_taps(paths)

    @property
    def bytes_per_sample(self) -> float:
        return store_info(self.path, self.manifest).bytes_per_sample

    def _gather(self, field: str, idx: np.ndarray) -> np.ndarray:
        shards = self._arrays[field]
        if len(shards) == 1:
            return shards[0][idx]
        s, off = np.divmod(idx, self.shard_size)
        first = shards[0]
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for shard in np.unique(s):
            m = s == shard
            out[m] = shards[shard][off[m]]
        return out

    def __call__(self, batch: Batch) -> Outputs:
        if batch.index is None:
            if self.fallback is not None:
                return self.fallback(batch)
            raise DistillError(
                "this batch carries no sample index, so the teacher store cannot serve it: wrap the "
                "training dataset in distill.data.indexed.IndexedDataset (or AugmentedCopies), and give "
                "CachedTeacher a fallback teacher for validation data"
            )
        device = self._device or batch.index.device
        index = batch.index
        if index.device.type != "cpu" and batch.raw is not None:
            # The loader's own (host) copy of the index avoids a device-to-host sync per step.
            try:
                host = as_batch(batch.raw).index
            except DistillError:
                host = None
            if isinstance(host, Tensor) and host.device.type == "cpu" and host.shape == index.shape:
                index = host
        idx = index.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows):
            raise DistillError(
                f"sample index {int(idx.max() if idx.max() >= self.rows else idx.min())} is outside the "
                f"teacher store ({self.rows} entries): the store was written for another dataset"
            )

        width = None
        if self.manifest.get("seq_len") and isinstance(batch.inputs, dict) and "input_ids" in batch.inputs:
            width = batch.inputs["input_ids"].shape[1]  # stored padded to seq_len: this batch's columns

        def get(field: str) -> Tensor:
            arr = self._gather(field, idx)
            if width is not None:
                arr = arr[:, :width]
            return torch.from_numpy(np.ascontiguousarray(arr)).to(device, non_blocking=True)

        features = {p: get(f"feat.{i}").float() for i, p in enumerate(self.taps)}
        if self.topk is None:
            logits = get("logits").float()
        elif self.fill == "bucket":  # no dense logits: the fkl term reads the top-k and the tail bucket
            sparse = {
                "topk_values": get("topk_values"),
                "topk_indices": get("topk_indices"),
                "lse": get("lse"),
            }
            return Outputs(logits=None, features=features, extras=sparse)
        else:
            logits = reconstruct_logits(
                get("topk_values"), get("topk_indices"), self.classes, get("lse"), self.fill
            )
        return Outputs(logits=logits, features=features)
