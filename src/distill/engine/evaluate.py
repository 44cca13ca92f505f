"""Evaluation: an `Evaluator` accumulates over batches; `evaluate` runs a model over a loader."""

from __future__ import annotations

import math
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


EVALUATORS.accept(
    methods=("reset", "update", "compute"), what="an evaluator (a class with reset, update and compute)"
)


@EVALUATORS.register("classification")
class ClassificationEvaluator:
    """Top-1 accuracy, mean negative log-likelihood, macro-F1 (for (B, C) logits: the unweighted
    mean over classes present in targets or predictions), and top-1 agreement with the teacher.

    Works for (B, C) logits; (B, T, V) logits are scored per token, skipping targets of -100.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.correct = self.total = self.agree = self.n_teacher = 0
        self.nll = 0.0
        self.confusion: torch.Tensor | None = None  # (C, C) target x prediction, (B, C) logits only
        self.mixed_heads = False  # batches of heads with other class counts (multi-task): no one macro-F1

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
            if student.logits.dim() == 2:
                c = logits.shape[-1]
                if self.confusion is None:
                    self.confusion = torch.zeros(c, c, dtype=torch.long)
                self.mixed_heads |= self.confusion.shape[0] != c
                if not self.mixed_heads:
                    flat = (y[keep] * c + pred[keep]).cpu()
                    self.confusion += torch.bincount(flat, minlength=c * c).reshape(c, c)
        if teacher is not None and teacher.logits is not None:
            t_pred = teacher.logits.reshape(-1, teacher.logits.shape[-1]).argmax(-1)
            self.agree += int((pred == t_pred).sum())
            self.n_teacher += pred.numel()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.total:
            out["accuracy"] = self.correct / self.total
            out["nll"] = self.nll / self.total
        if self.confusion is not None and not self.mixed_heads:
            out["macro_f1"] = macro_f1(self.confusion)
        if self.n_teacher:
            out["agreement"] = self.agree / self.n_teacher
        return out


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-F1 from a (C, C) confusion matrix (rows: targets, columns: predictions), over the
    classes that occur as a target or a prediction."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return float(f1[present].mean()) if bool(present.any()) else 0.0


@EVALUATORS.register("perplexity")
class PerplexityEvaluator:
    """Token-level NLL and perplexity of a causal LM: position t predicts label t+1 (the Hugging Face
    convention for `labels`), labels of -100 are skipped. Also top-1 token agreement with the teacher."""

    def __init__(self, shift: bool = True):
        self.shift = shift
        self.reset()

    def reset(self) -> None:
        self.nll = 0.0
        self.tokens = self.agree = self.correct = self.chars = 0

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
        chars = batch.inputs.get("label_chars") if isinstance(batch.inputs, dict) else None
        if chars is not None:  # texts with byte offsets (any tokenizer): the characters the labels cover
            self.chars += int(chars.sum())
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
        if self.chars:  # comparable across tokenizers, unlike per-token perplexity
            out["bits_per_char"] = self.nll / math.log(2) / self.chars
        return out


@EVALUATORS.register("embedding")
class EmbeddingEvaluator:
    """Mean cosine similarity between student and teacher sentence embeddings
    (`extras["embeddings"]`, or the logits when a model returns its embedding as its output), and
    nearest-neighbour retrieval agreement: each text queries the other texts of the split by
    cosine; `retrieval_top1` is how often the student's nearest neighbour is the teacher's,
    `retrieval_top10` the mean overlap of the two top-10 sets (up to `max_retrieval` texts)."""

    def __init__(self, key: str = "embeddings", max_retrieval: int = 2000):
        self.key = key
        self.max_retrieval = max_retrieval
        self.reset()

    def reset(self) -> None:
        self.cos = 0.0
        self.n = 0
        self.s_emb: list[torch.Tensor] = []
        self.t_emb: list[torch.Tensor] = []

    def _emb(self, out: Outputs):
        e = out.extras.get(self.key)
        return e if e is not None else out.require_logits()

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        if teacher is None:
            return
        s, t = self._emb(student).float(), self._emb(teacher).float()
        self.cos += float(F.cosine_similarity(s, t, dim=-1).sum())
        if self.n < self.max_retrieval:
            self.s_emb.append(F.normalize(s, dim=-1).cpu())
            self.t_emb.append(F.normalize(t, dim=-1).cpu())
        self.n += s.shape[0]

    def compute(self) -> dict[str, float]:
        if not self.n:
            return {}
        out = {"cosine": self.cos / self.n}
        if self.s_emb:
            s = torch.cat(self.s_emb)[: self.max_retrieval]
            t = torch.cat(self.t_emb)[: self.max_retrieval]
            if len(s) > 1:
                k = min(10, len(s) - 1)
                eye = torch.eye(len(s), dtype=torch.bool)
                s_nn = (s @ s.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices  # (N, k)
                t_nn = (t @ t.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices
                out["retrieval_top1"] = float((s_nn[:, 0] == t_nn[:, 0]).float().mean())
                overlap = (s_nn.unsqueeze(-1) == t_nn.unsqueeze(-2)).any(-1).float().sum(-1) / k
                out[f"retrieval_top{k}"] = float(overlap.mean())
        return out


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
