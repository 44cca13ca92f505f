"""Checkpoints: safetensors only, written atomically, never unpickled.

A training checkpoint is one `.safetensors` file. Its tensors are the leaves of a nested state
(model, objective adapters, optimizer, LR scheduler, scaler, RNG states) flattened to
`a.b.0.c` keys; the rest of the structure travels as JSON in the file's metadata. So a checkpoint
can be read by any safetensors reader and cannot carry code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.errors import CheckpointError, DistillError

_META_KEY = "distill"


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replaces every tensor in `obj` by a reference and collects it in `tensors`."""
    if isinstance(obj, Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {
            "__dict__": [
                [_json_key(k), _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays (RNG state)
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store a value of type {type(obj).__name__} in a checkpoint")


def _json_key(k: Any) -> Any:
    if isinstance(k, bool | int | float | str) or k is None:
        return k
    raise CheckpointError(f"cannot store a mapping key of type {type(k).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def lock_or_refuse(path: str | os.PathLike, busy: str) -> int:
    """Takes an exclusive lock on the file `path` (created if missing) without waiting and returns
    its descriptor; raises `DistillError(busy)` when another process holds it (a second writer is
    refused at once). Release with `unlock`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DistillError(busy) from None
    return fd


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str):
    """`lock_or_refuse` for the length of a `with` block."""
    fd = lock_or_refuse(path, busy)
    try:
        yield
    finally:
        unlock(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls `write(tmp_path)`, then renames onto `path`: readers see the old file or the new
    one, never a half-written one. On failure (disk full, ...) the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise CheckpointError(
                f"disk full while writing {path}; free space and resume (the previous file is intact)"
            ) from e
        raise


def _is_disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC, or safetensors' own error type, which carries the OS error only in
    its text (`IoError(Os { code: 28, kind: StorageFull, ... })`)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, SafetensorError):
        text = str(e)
        return "StorageFull" in text or f"code: {errno.ENOSPC}," in text or os.strerror(errno.ENOSPC) in text
    return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Saves a nested training state (tensors anywhere inside) as one safetensors file."""
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(dict(state), "", tensors)
    meta = {_META_KEY: json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Loads what `save_state` wrote; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    if _META_KEY not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not a distill training checkpoint "
            "(no distill metadata); load it as weights instead"
        )
    return _unflatten(json.loads(meta[_META_KEY]), tensors)


def _missing(path: Path) -> CheckpointError:
    """The error for a checkpoint path that is not a file: a folder is said to be one, with the
    weights files found in it (a run folder's `checkpoints/<stage>/final.safetensors`)."""
    if not path.is_dir():
        return CheckpointError(f"checkpoint {path} does not exist")
    found = sorted(path.glob("checkpoints/*/final.safetensors")) or sorted(path.glob("*.safetensors"))
    hint = (
        f"e.g. {', '.join(str(f) for f in found[:3])}"
        if found
        else "a .safetensors file (a run folder keeps them in checkpoints/<stage>/final.safetensors)"
    )
    return CheckpointError(
        f"checkpoint {path} is a folder, not a weights file: a checkpoint is one weights file, {hint}; "
        "a Hugging Face model folder (student_hf/) is loaded with name: hf, init_args.path: FOLDER"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise _missing(path)
    if not is_safetensors(path):
        raise CheckpointError(
            f"{path} is not a safetensors file (truncated, corrupted, or another "
            "format); distill reads weights only from safetensors or weights-only files"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}); use another checkpoint") from e


def is_safetensors(path: str | os.PathLike) -> bool:
    """Checks the header: 8-byte little-endian length, then a JSON object that fits the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= size


def save_weights(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Saves plain model weights (readable by anyone with safetensors), atomically."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a weights file without ever executing code in it.

    safetensors files are read directly. Anything else is tried with
    `torch.load(weights_only=True)`, which refuses pickled code; a refusal is reported as such.
    A training checkpoint written by distill gives its student weights.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    if is_safetensors(path):
        tensors, meta = _read_safetensors(path)
        if _META_KEY in meta:
            state = _unflatten(json.loads(meta[_META_KEY]), tensors)
            if "model" in state:
                return state["model"]
        return tensors
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means: not a plain weights file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: it is not safetensors and not a plain weights file ({msg}); "
            "pickled code is never executed - convert it to safetensors"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Loads weights strictly; on any mismatch names the differing keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tied = _tied_to_present(own, missing, state)
    if tied:  # a tied weight (lm_head.weight = the embedding) is saved once: fill it from its twin
        state = {**state, **{k: state[src] for k, src in tied.items()}}
        missing = [k for k in missing if k not in tied]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)} (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: {'; '.join(parts)}; "
            "is it a checkpoint of another architecture?"
        )
    model.load_state_dict(state, strict=True)


def _tied_to_present(
    own: Mapping[str, Tensor], missing: list[str], state: Mapping[str, Tensor]
) -> dict[str, str]:
    """Missing keys whose tensor shares storage with a key that is present (tied weights)."""
    by_ptr: dict[tuple[int, tuple[int, ...]], str] = {}
    for k, v in own.items():
        if k in state and v.numel():
            by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), k)
    out = {}
    for k in missing:
        v = own[k]
        src = by_ptr.get((v.data_ptr(), tuple(v.shape))) if v.numel() else None
        if src is not None:
            out[k] = src
    return out


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    load_into(model, load_weights_file(path), source=str(path))
    return model
