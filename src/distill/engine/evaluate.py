"""Evaluation: an `Evaluator` accumulates over batches; `evaluate` runs a model over a loader."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from distill.adapters import Adapter, auto_adapter
from distill.outputs import Batch, Outputs, as_batch
from distill.registry import EVALUATORS


class Evaluator(Protocol):
    """`reset()`, then `update(student_out, teacher_out_or_None, batch)` per batch, then `compute()`."""

    def reset(self) -> None: ...

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...


@EVALUATORS.register("classification")
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


@EVALUATORS.register("perplexity")
class PerplexityEvaluator:
    """Token-level NLL and perplexity of a causal LM: position t predicts label t+1 (the Hugging Face
    convention for `labels`), labels of -100 are skipped. Also top-1 token agreement with the teacher."""

    def __init__(self, shift: bool = True):
        self.shift = shift
        self.reset()

    def reset(self) -> None:
        self.nll = 0.0
        self.tokens = self.agree = self.correct = 0

    def _align(self, logits, labels):
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        if batch.targets is None:
            return
        logits, labels = self._align(student.require_logits("student"), batch.targets)
        keep = labels != -100
        logits, labels = logits[keep], labels[keep].long()
        self.nll += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.tokens += int(keep.sum())
        pred = logits.argmax(-1)
        self.correct += int((pred == labels).sum())
        if teacher is not None and teacher.logits is not None:
            t_logits, _ = self._align(teacher.logits, batch.targets)
            self.agree += int((t_logits[keep].argmax(-1) == pred).sum())

    def compute(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        nll = self.nll / self.tokens
        out = {
            "nll": nll,
            "perplexity": float(torch.exp(torch.tensor(nll))),
            "accuracy": self.correct / self.tokens,
        }
        if self.agree:
            out["agreement"] = self.agree / self.tokens
        return out


@EVALUATORS.register("embedding")
class EmbeddingEvaluator:
    """Mean cosine similarity between student and teacher sentence embeddings
    (`extras["embeddings"]`, or the logits when a model returns its embedding as its output)."""

    def __init__(self, key: str = "embeddings"):
        self.key = key
        self.reset()

    def reset(self) -> None:
        self.cos = 0.0
        self.n = 0

    def _emb(self, out: Outputs):
        e = out.extras.get(self.key)
        return e if e is not None else out.require_logits()

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        if teacher is None:
            return
        s, t = self._emb(student).float(), self._emb(teacher).float()
        self.cos += float(F.cosine_similarity(s, t, dim=-1).sum())
        self.n += s.shape[0]

    def compute(self) -> dict[str, float]:
        return {"cosine": self.cos / self.n} if self.n else {}


def build_evaluator(spec: dict | None):
    """`None` means classification; else `{name | class_path, init_args}`."""
    if not spec:
        return ClassificationEvaluator()
    return EVALUATORS.build(
        name=spec.get("name"), class_path=spec.get("class_path"), init_args=spec.get("init_args")
    )


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
