"""The loss-term contract every distillation method follows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES


class LossTerm(nn.Module):
    """One term of an `Objective`: `forward(student, teacher, batch) -> scalar Tensor`.

    Subclasses set `needs_teacher = False` when they only use the labels, list the feature
    paths they read in `student_taps` / `teacher_taps`, and may create small trainable adapters
    in `setup`, which the trainer calls once on a first batch before the optimizer is built (so
    adapter shapes come from the real tapped shapes, and the adapters are trained and
    checkpointed with the student).
    """

    needs_teacher: bool = True
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:  # noqa: B027
        """Creates adapters from the first batch's shapes; the default needs none."""

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        raise NotImplementedError


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise DistillError(f"{name} must be > 0, got {value}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise DistillError(f"{name} must be in [{lo}, {hi}], got {value}")


def check_same_shape(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    """Teacher and student must agree; the common mistake is a different class count."""
    if student.shape != teacher.shape:
        if what == "logits" and student.shape[:-1] == teacher.shape[:-1]:
            raise DistillError(
                f"teacher has {teacher.shape[-1]} classes but student has {student.shape[-1]}: "
                "give both models the same number of outputs"
            )
        raise DistillError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ in shape"
        )


def flatten_logits(logits: Tensor) -> Tensor:
    """(B, C) stays; (B, T, V) becomes (B*T, V), so token-level logits use the same math."""
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0·log 0 terms count as 0.

    The log-ratio is masked *before* the product with p: masking the product only leaves
    0·(-inf) = NaN in the value (a -inf teacher logit) or in the backward (a -inf student
    logit), so -inf logits on both sides give the value and gradient of the vocabulary
    without them. A token where p > 0 and q = 0 gives +inf, as it should.
    """
    p = log_p.exp()
    ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * ratio).sum(-1)


def reduce(per_sample: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """Mean (or sum) over samples, optionally weighted per sample.

    `weights` is (N,), one per row; or (B,) for the N = B·T rows of flattened (B, T, V) logits,
    spread over each sample's T rows.
    """
    if weights is not None:
        w = weights.reshape(-1).to(per_sample.device, per_sample.dtype)
        n = per_sample.shape[0]
        if w.numel() != n:
            if w.numel() == 0 or n % w.numel():
                raise DistillError(
                    f"{w.numel()} per-sample weights for {n} rows; give one weight per sample or per row"
                )
            w = w.repeat_interleave(n // w.numel())  # (B,) -> (B*T,), rows are sample-major
        weights = w
        per_sample = per_sample * w
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    if weights is not None:
        return per_sample.sum() / weights.sum().clamp_min(1e-12)
    return per_sample.mean()


LOSSES.accept(LossTerm, what="a loss term (a LossTerm subclass)")
