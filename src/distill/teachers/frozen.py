"""The frozen side: a teacher is always in eval mode, never trained, run without autograd."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from distill.adapters import Adapter, auto_adapter
from distill.outputs import Batch, Outputs, map_tensors
from distill.taps import FeatureTap


class Teacher:
    """A frozen model that produces `Outputs` for a batch.

    The model is put in eval mode with gradients off, so BatchNorm uses its running statistics
    and nothing about the teacher changes during distillation. It is deliberately not an
    `nn.Module` attribute of the training task: it is not checkpointed, not wrapped by DDP and
    not seen by the optimizer.

    Args:
        model: any `nn.Module`.
        adapter: how to call it on a batch (default: `auto_adapter`).
        taps: module paths whose outputs feature losses need.
        dtype: run the teacher's weights in this dtype (e.g. `torch.bfloat16` on GPU); its
            outputs are returned in float32.
        compile: wrap the forward in `torch.compile`, falling back to eager if that fails.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter = auto_adapter,
        taps: Iterable[str] = (),
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        self.model = model.eval().requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype)
        self.dtype = dtype
        self.adapter = adapter
        self.tap = FeatureTap(self.model, taps, detach=True)
        self._forward = self._compiled() if compile else self.adapter

    def _compiled(self):
        try:
            fn = torch.compile(self.model)
            return lambda _m, batch: self.adapter(fn, batch)
        except Exception:  # noqa: BLE001 - compile is an optimisation, never a requirement
            return self.adapter

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    def add_taps(self, paths: Iterable[str]) -> None:
        paths = [p for p in paths if p not in self.tap.paths]
        if paths:
            self.tap.remove()
            self.tap = FeatureTap(self.model, self.tap.paths + paths, detach=True)

    def __call__(self, batch: Batch) -> Outputs:
        self.model.eval()
        if self.dtype is not None:  # floating inputs follow the weights' dtype, also inside lists/dicts
            cast = map_tensors(batch.inputs, lambda t: t.to(self.dtype) if t.is_floating_point() else t)
            batch = dataclasses.replace(batch, inputs=cast)
        with torch.inference_mode():
            out = self._forward(self.model, batch)
            out.features.update(self.tap.collect())
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        out = out.clone()
        if self.dtype is not None:
            out = out.map(lambda t: t.float() if t.is_floating_point() else t)
        return out
