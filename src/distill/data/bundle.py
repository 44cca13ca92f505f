"""What a recipe's `data` section builds: train/val/test splits plus what models need to know."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from distill.errors import DistillError
from distill.registry import DATASETS


@dataclass
class DataBundle:
    """Splits and facts about a dataset.

    Attributes:
        train / val / test: map-style datasets (val and test may be None).
        num_classes: for classification; passed to models as `num_classes` when they take it.
        input_shape: one sample's input shape, e.g. (1, 8, 8).
        collate_fn: for batches that torch's default collate cannot build (detection).
        meta: anything else worth recording (sizes, source).
    """

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    collate_fn: Callable | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self) -> DataBundle:
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            if ds is not None and len(ds) == 0:
                raise DistillError(f"the {name} split is empty: check the dataset path and split sizes")
        return self


def build_data(
    name: str | None = None, class_path: str | None = None, init_args: dict | None = None, seed: int = 0
) -> DataBundle:
    """Builds a registered dataset (`digits`, ...) or any `class_path` returning a DataBundle."""
    args = dict(init_args or {})
    args.setdefault("seed", seed)
    bundle = DATASETS.build(name=name, class_path=class_path, init_args=args)
    if not isinstance(bundle, DataBundle):
        raise DistillError(
            f"dataset '{class_path or name}' returned {type(bundle).__name__}, not a DataBundle"
        )
    return bundle.check()
