"""What a recipe's `data` section builds: train/val/test splits plus what models need to know."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
        collate_fn: for batches that torch's default collate cannot build (detection, text).
        tokenizer: for text data, the tokenizer that made the token ids (models built for this
            data receive it, and Hugging Face students are saved with it).
        meta: anything else worth recording (sizes, source).
    """

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    collate_fn: Callable | None = None
    tokenizer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self) -> DataBundle:
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            if ds is not None and len(ds) == 0:
                raise DistillError(f"the {name} split is empty: check the dataset path and split sizes")
        return self


DATASETS.accept(DataBundle, what="a data builder (a function returning a DataBundle)")


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


def start_generated_folder(root: Path, manifest: dict[str, Any], overwrite: bool = False) -> Path | None:
    """For generators that write a data folder once and reuse it.

    Returns None when `root` already holds a folder made with this `manifest` (reuse it); else an
    empty temp folder beside `root` to write into and rename onto `root` when complete. A folder
    made with other arguments is refused unless `overwrite`.
    """
    if root.exists():
        try:
            found = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):
            found = None
        if found == manifest:
            return None
        if not overwrite:
            raise DistillError(
                f"{root} already exists and was not made with these arguments; "
                "pick another folder or pass overwrite=True"
            )
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp
