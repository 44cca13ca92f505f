"""Builds a model from a recipe component, filling in what the data tells (classes, input size)."""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from distill.data.bundle import DataBundle
from distill.errors import ConfigError
from distill.registry import MODELS, import_path


def build_model(
    spec: dict[str, Any], data: DataBundle | None = None, teacher: nn.Module | None = None
) -> nn.Module:
    """`spec` is `{name | class_path, init_args}`. When the builder takes `num_classes`,
    `in_features`, `in_channels`, `tokenizer` or `label_names` and the recipe does not set them,
    they come from the data; a
    builder taking `teacher` (a student made from the teacher's layers) gets the teacher model,
    and one taking `calibration` the training split's first examples (`TrainingExamples`)."""
    target = import_path(spec["class_path"]) if spec.get("class_path") else MODELS.get(spec.get("name") or "")
    args = dict(spec.get("init_args") or {})
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    if data is not None:
        fill = {}
        if data.num_classes is not None:
            fill["num_classes"] = data.num_classes
        if data.tokenizer is not None:
            fill["tokenizer"] = data.tokenizer
        if data.meta.get("label_names"):
            fill["label_names"] = list(data.meta["label_names"])
        if data.input_shape:
            fill["in_features"] = math.prod(data.input_shape)
            fill["in_channels"] = data.input_shape[0]
        if data.train is not None:
            fill["calibration"] = TrainingExamples(data.train, data.collate_fn)
        for k, v in fill.items():
            if k in params and k not in args:
                args[k] = v
    if teacher is not None and "teacher" in params and "teacher" not in args:
        args["teacher"] = teacher
    try:
        model = target(**args)
    except TypeError as e:
        raise ConfigError(f"model '{spec.get('class_path') or spec.get('name')}': {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model '{spec.get('class_path') or spec.get('name')}' built a "
            f"{type(model).__name__}, not an nn.Module"
        )
    return model


class TrainingExamples:
    """Examples of a training split for a builder that measures its teacher on real data (a
    student cut by importance): evenly spaced over the split (a file sorted by topic still gives
    every topic), in a fixed order, so every stage and seed of a run gets the same ones. Nothing
    is read until `batches` is called."""

    def __init__(self, dataset, collate_fn=None):
        self.dataset = dataset
        self.collate_fn = collate_fn

    def batches(self, batch_size: int, n: int) -> list:
        """`n` batches of `batch_size` examples (fewer when the split is smaller)."""
        from torch.utils.data import DataLoader, Subset

        try:
            total = len(self.dataset)
        except TypeError:  # a stream: its first examples
            import itertools

            rows = list(itertools.islice(iter(self.dataset), batch_size * n))
            return list(DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn))
        k = min(total, batch_size * n)
        picks = sorted({i * total // k for i in range(k)})  # k distinct, evenly spaced indices
        loader = DataLoader(
            Subset(self.dataset, picks), batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn
        )
        return list(loader)
