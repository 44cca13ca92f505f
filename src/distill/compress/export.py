"""ONNX export of any model that takes a tensor or a mapping of tensors and returns logits."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.adapters import call_model, read_outputs
from distill.checkpoint import atomic_write
from distill.errors import DistillError


class _Positional(nn.Module):
    """Calls the wrapped model with keyword inputs rebuilt from positional tensors and returns the
    logits tensor alone, so every model exports with named inputs and one `logits` output."""

    def __init__(self, model: nn.Module, keys: list[str] | None):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *xs: Tensor) -> Tensor:
        inputs = dict(zip(self.keys, xs, strict=True)) if self.keys else xs[0]
        return read_outputs(call_model(self.model, inputs)).require_logits("model")


def input_names(example: Any) -> list[str]:
    return list(example) if isinstance(example, Mapping) else ["input"]


def to_numpy_inputs(inputs: Any, names: list[str]) -> dict[str, Any]:
    """A batch's inputs as the ONNX session's feed: {"input": array} or one array per key."""
    if isinstance(inputs, Mapping):
        return {k: inputs[k].detach().cpu().numpy() for k in names}
    return {names[0]: inputs.detach().cpu().float().numpy()}


def export_onnx(model: nn.Module, example: Any, path: str | Path, opset: int = 17) -> Path:
    """Writes `model` as ONNX with a dynamic batch dimension (TorchScript-based exporter).

    Raises:
        DistillError: naming the operator when one has no ONNX equivalent at `opset`.
    """
    path = Path(path)
    names = input_names(example)
    keys = names if isinstance(example, Mapping) else None
    args = tuple(example[k] for k in names) if keys else (example,)
    wrapper = _Positional(model, keys).eval()
    axes = {n: {0: "batch"} for n in names} | {"logits": {0: "batch"}}
    if keys:  # token inputs: the sequence length may vary too
        axes.update({n: {0: "batch", 1: "sequence"} for n in names if example[n].dim() == 2})

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                dynamo=False,
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )

    try:
        atomic_write(path, lambda tmp: write(Path(tmp)))
    except Exception as e:  # noqa: BLE001 - every exporter failure becomes one line
        text = str(e)
        op = re.search(r"operator '([\w:.]+)'", text)
        if op:
            raise DistillError(
                f"{type(model).__name__} does not export to ONNX: operator {op.group(1)} is not supported "
                f"at opset {opset}; replace that operation or raise compress.export.opset"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise DistillError(f"{type(model).__name__} does not export to ONNX: {first[:300]}") from None
    return path
