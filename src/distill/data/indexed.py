"""A dataset wrapper that adds each sample's index, for terms keyed by sample (CRD's memory
bank, the teacher cache)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.errors import DistillError
from distill.registry import DATASETS


class IndexedDataset:
    """Wraps a map-style dataset so that item `i` also carries `i`.

    `(x, y)` items become `(x, y, i)`; mapping items gain an `"index"` key; any other item `x`
    becomes `{"inputs": x, "index": i}`. `distill.outputs.as_batch` reads all three forms, so
    after the default collate `batch.index` is a (B,) LongTensor.

    Args:
        dataset: any object with `__len__` and `__getitem__` (a torch `Dataset`).
    """

    def __init__(self, dataset: Any):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DistillError(
                f"IndexedDataset needs a map-style dataset (with __len__ and __getitem__), "
                f"got {type(dataset).__name__}; iterable datasets have no stable sample index"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, tuple | list):
            if len(item) != 2:
                raise DistillError(
                    f"IndexedDataset: item {i} has {len(item)} fields; expected (inputs, targets)"
                )
            return item[0], item[1], i
        if isinstance(item, Mapping):
            if "index" in item:
                raise DistillError(f"IndexedDataset: item {i} already has an 'index' key")
            return {**item, "index": i}
        return {"inputs": item, "index": i}

    def __getattr__(self, name: str) -> Any:
        # Forward attributes (classes, targets, ...) to the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def indexed(dataset: str | dict = "digits", seed: int = 0):
    """A recipe's `data` wrapper that gives the training split sample indices (for `crd`):
    `data: {name: indexed, init_args: {dataset: {name: digits, init_args: {...}}}}`.

    Returns the inner `DataBundle` with `train` wrapped in `IndexedDataset`; its size is in
    `meta["n_train"]` (CRD's `n_data`).
    """
    import dataclasses

    from distill.data.bundle import build_data

    spec = {"name": dataset} if isinstance(dataset, str) else dict(dataset)
    unknown = set(spec) - {"name", "class_path", "init_args"}
    if unknown:
        raise DistillError(f"indexed.dataset: unknown keys {sorted(unknown)}; use name/class_path/init_args")
    inner = build_data(spec.get("name"), spec.get("class_path"), spec.get("init_args"), seed=seed)
    meta = {**inner.meta, "indexed": True, "n_train": len(inner.train)}
    return dataclasses.replace(inner, train=IndexedDataset(inner.train), meta=meta)


DATASETS.register("indexed")(indexed)
