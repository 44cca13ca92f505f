"""Evaluation: an `Evaluator` accumulates over batches; `evaluate` runs a model over a loader."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from distill.adapters import Adapter, auto_adapter
from distill.outputs import Batch, Outputs, as_batch


class Evaluator(Protocol):
    """`reset()`, then `update(student_out, teacher_out_or_None, batch)` per batch, then `compute()`."""

    def reset(self) -> None: ...

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...


class ClassificationEvaluator:
    """Top-1 accuracy, mean negative log-likelihood, and top-1 agreement with the teacher.

    Works for (B, C) logits; (B, T, V) logits are scored per token, skipping targets of -100.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.correct = self.total = self.agree = self.n_teacher = 0
        self.nll = 0.0

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        logits = student.require_logits("student").float()
        logits = logits.reshape(-1, logits.shape[-1])
        pred = logits.argmax(-1)
        if batch.targets is not None:
            y = batch.targets.reshape(-1).long()
            keep = y != -100
            self.correct += int((pred[keep] == y[keep]).sum())
            self.total += int(keep.sum())
            self.nll += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
        if teacher is not None and teacher.logits is not None:
            t_pred = teacher.logits.reshape(-1, teacher.logits.shape[-1]).argmax(-1)
            self.agree += int((pred == t_pred).sum())
            self.n_teacher += pred.numel()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.total:
            out["accuracy"] = self.correct / self.total
            out["nll"] = self.nll / self.total
        if self.n_teacher:
            out["agreement"] = self.agree / self.n_teacher
        return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    evaluator: Any = None,
    adapter: Adapter = auto_adapter,
    teacher: Any = None,
    device: torch.device | str | None = None,
    teacher_cache: list[Outputs] | None = None,
) -> dict[str, float]:
    """Scores `model` over `loader` with `evaluator` (default: classification).

    Args:
        teacher: when given, its outputs are passed to the evaluator (for agreement).
        teacher_cache: a list reused across calls on the same unshuffled loader: filled with the
            teacher's outputs on the first call, read on later ones, so the frozen teacher runs
            over the validation set once per training instead of once per epoch.
    """
    evaluator = evaluator or ClassificationEvaluator()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    evaluator.reset()
    fill = teacher_cache is not None and not teacher_cache
    for i, raw in enumerate(loader):
        batch = as_batch(raw).to(device)
        t_out = None
        if teacher is not None:
            if teacher_cache is not None and not fill:
                t_out = teacher_cache[i]
            else:
                t_out = teacher(batch)
                if fill:
                    teacher_cache.append(Outputs(logits=t_out.logits, extras=t_out.extras))
        evaluator.update(adapter(model, batch), t_out, batch)
    model.train(was_training)
    return evaluator.compute()
