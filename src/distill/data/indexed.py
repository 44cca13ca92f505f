"""A dataset wrapper that adds each sample's index, for terms keyed by sample (CRD's memory
bank, the teacher cache)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.errors import DistillError


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
