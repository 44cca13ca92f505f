"""Builds a model from a recipe component, filling in what the data tells (classes, input size)."""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from distill.data.bundle import DataBundle
from distill.errors import ConfigError
from distill.registry import MODELS

MODELS.accept(nn.Module, what="a model (an nn.Module subclass)")


def build_model(
    spec: dict[str, Any], data: DataBundle | None = None, teacher: nn.Module | None = None
) -> nn.Module:
    """`spec` is `{name | class_path, init_args}`. When the builder takes `num_classes`,
    `in_features`, `in_channels`, `tokenizer` or `label_names` and the recipe does not set them,
    they come from the data; a
    builder taking `teacher` (a student made from the teacher's layers) gets the teacher model."""
    target = (
        MODELS.resolve(spec["class_path"]) if spec.get("class_path") else MODELS.get(spec.get("name") or "")
    )
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
