"""Logit-level terms: cross-entropy, Hinton KD, logit MSE.

Each term is a small module over a plain tensor function users can call directly. All math is
done in float32, whatever precision the models ran in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.base import (
    LossTerm,
    check_positive,
    check_range,
    check_same_shape,
    flatten_logits,
    reduce,
)
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
    KL(softmax(t/T) || softmax(s/T)) · T².

    The T² keeps the gradient's magnitude independent of T (the soft gradients scale as 1/T²).

    Args:
        student_logits: (B, C) or (B, T, V).
        teacher_logits: same shape as the student's.
        temperature: T > 0, a float or a scalar tensor (a learnable temperature).
        weights: optional per-sample weights, (B,) or (B*T,).
        reduction: "mean" over samples (KL summed over classes), "sum" or "none".

    Returns:
        A scalar, or (N,) for reduction="none".
    """
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (N,)
    return reduce(per_sample, weights, reduction) * temperature**2


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the student against the teacher's softened distribution, · T².

    Equals `kd_loss` plus the teacher's entropy (a constant for the student), so the gradients
    are the same; the value is what some papers and codebases report.
    """
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    p_t = F.softmax(t / temperature, dim=-1)
    per_sample = -(p_t * F.log_softmax(s / temperature, dim=-1)).sum(-1)
    return reduce(per_sample, weights, reduction) * temperature**2


def logit_mse(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014), averaged over classes."""
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    return reduce((s - t).pow(2).mean(-1), weights, reduction)


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy on the ground-truth labels, with optional label smoothing.

    Args:
        label_smoothing: in [0, 1).
        ignore_index: target value to skip (padding in token-level tasks).
    """

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        check_range("ce.label_smoothing", label_smoothing, 0.0, 0.999)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        # Validating labels costs a host sync per call on CUDA; the Trainer turns this off there
        # and checks each batch's labels on the host copy instead.
        self.check_labels = True

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise DistillError(
                "the ce term needs labels but the batch has none; drop the ce term for unlabeled data"
            )
        logits = flatten_logits(student.require_logits("student")).float()
        targets = batch.targets.reshape(-1).long()
        n = logits.shape[-1]
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= n)) if self.check_labels else None
        if self.check_labels and bad.any():
            i = int(bad.nonzero()[0, 0])
            raise DistillError(
                f"label {int(targets[i])} is out of range for {n} classes (at position {i} of the batch)"
            )
        return F.cross_entropy(
            logits, targets, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index
        )


@LOSSES.register("kd")
class KD(LossTerm):
    """Hinton KD on logits; see `kd_loss`.

    Args:
        temperature: T > 0; schedulable as `<term>.temperature`.
        form: "kl" (default) or "soft_ce" (cross-entropy against the soft targets).
    """

    def __init__(self, temperature: float = 4.0, form: str = "kl"):
        super().__init__()
        check_positive("kd.temperature", temperature)
        if form not in ("kl", "soft_ce"):
            raise DistillError(f"kd.form: '{form}' is not one of kl, soft_ce")
        self.temperature = temperature
        self.form = form

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        fn = kd_loss if self.form == "kl" else soft_cross_entropy
        return fn(
            student.require_logits("student"),
            teacher.require_logits("teacher"),
            self.temperature,
            weights=_sample_weights(batch),
        )


@LOSSES.register("logit_mse")
class LogitMSE(LossTerm):
    """MSE between student and teacher logits; see `logit_mse`."""

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return logit_mse(
            student.require_logits("student"),
            teacher.require_logits("teacher"),
            weights=_sample_weights(batch),
        )


def _sample_weights(batch: Batch) -> Tensor | None:
    """Per-sample weights a weighting rule attached to the batch (None: uniform)."""
    return batch.weights
