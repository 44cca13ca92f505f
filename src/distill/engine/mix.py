"""Batch mixing (mixup, cutmix) applied by the loop before teacher and student see the batch.

Consistent teaching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent"): when both models see the same mixed input, the teacher is queried on images it never
memorised, so its outputs carry more than the label, and the student matches the teacher's
function there. A student trained from labels alone gets the same mixing with mixed labels, so a
scratch twin stays a fair comparison.

The contract with the loss terms: a mixed batch has `targets=None` and `soft_targets` (B, C), each
row the mixed label distribution `lam * onehot(y_a) + (1 - lam) * onehot(y_b)`. A sample without a
label (a transfer-set sample, or a label equal to a label term's `ignore_index`) contributes a zero
row, so a row sums to the share of the mixed sample that is labelled. The engine imports no loss:
label terms that read `soft_targets` (`ce`) handle it; a term that needs class indices refuses the
mixed batch, and the trainer turns that into a one-line error before training starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from distill.errors import ConfigError, DistillError
from distill.outputs import Batch


def soft_labels(
    targets: Tensor | None, batch_size: int, num_classes: int, ignore: Sequence[int] = (-100,)
) -> Tensor:
    """(B, C) one-hot rows from (B,) class indices; a missing label (None, or an ignored value) is a
    zero row. A label out of range that no term ignores is an error naming it."""
    if targets is None:
        return torch.zeros(batch_size, num_classes)
    if targets.is_floating_point() and targets.dim() == 2:
        return targets.float()  # already a distribution per sample
    t = targets.reshape(-1).long()
    _one_label_per_sample(t, batch_size)
    valid = (t >= 0) & (t < num_classes)
    if t.device.type == "cpu":  # on CUDA the trainer already checked the host copy of the labels
        ignored = torch.zeros_like(valid)
        for v in ignore:
            ignored |= t == v
        bad = ~valid & ~ignored
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise DistillError(
                f"label {int(t[i])} is out of range for {num_classes} classes (at position {i} of the batch)"
            )
    onehot = torch.zeros(batch_size, num_classes, device=t.device)
    onehot[valid, t[valid]] = 1.0
    return onehot


def _one_label_per_sample(t: Tensor, batch_size: int) -> None:
    if t.numel() != batch_size:
        raise ConfigError(
            f"trainer.mix mixes one class label per sample, but the batch has {t.numel()} targets for "
            f"{batch_size} samples (token or dense targets); set trainer.mix.name: none"
        )


def check_mixable(inputs, name: str, targets=None) -> None:
    """Mixing interpolates inputs: only floating-point tensors (images, spectrograms, features);
    and it mixes labels: one class label per sample (or a (B, C) distribution), when `targets` is
    given."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.dim() >= 2:
        if isinstance(targets, Tensor) and not (targets.is_floating_point() and targets.dim() == 2):
            _one_label_per_sample(targets.reshape(-1), inputs.shape[0])
        return
    if isinstance(inputs, Tensor):
        what = f"{inputs.dtype} inputs of shape {tuple(inputs.shape)}"
        if not inputs.is_floating_point():
            what = f"integer (token) inputs of dtype {inputs.dtype}"
    elif isinstance(inputs, Mapping):
        what = f"dict inputs ({', '.join(map(str, inputs))}): tokens"
    else:
        what = f"inputs of type {type(inputs).__name__}"
    raise ConfigError(
        f"trainer.mix: {name} interpolates floating-point inputs (images, spectrograms), not {what}; "
        "set trainer.mix.name: none"
    )


class Mixer:
    """Mixes batches: with probability `prob`, `x = lam * x + (1 - lam) * x[perm]` (mixup) or a box
    of `x[perm]` pasted into `x` (cutmix), `lam ~ Beta(alpha, alpha)`, labels mixed alike.

    The random draws depend only on (seed, epoch, batch index), so a resumed run mixes the same
    batches the same way.
    """

    def __init__(
        self,
        name: str,
        alpha: float,
        prob: float,
        num_classes: int,
        seed: int = 0,
        ignore: Sequence[int] = (-100,),
    ):
        if name not in ("mixup", "cutmix"):
            raise ConfigError(f"trainer.mix.name: '{name}' is not one of mixup, cutmix, none")
        self.name, self.alpha, self.prob = name, float(alpha), float(prob)
        self.num_classes, self.seed, self.ignore = num_classes, seed, tuple(ignore)

    def __call__(self, batch: Batch, epoch: int, i: int) -> Batch:
        rng = np.random.default_rng([self.seed, epoch, i, 0x6D6978])
        if rng.random() >= self.prob:
            return batch
        x = batch.inputs
        check_mixable(x, self.name)
        b = x.shape[0]
        perm = torch.from_numpy(rng.permutation(b)).to(x.device)
        lam = float(rng.beta(self.alpha, self.alpha))
        if self.name == "mixup":
            mixed = x * lam + x[perm] * (1.0 - lam)
        else:
            mixed, lam = _cutmix(x, perm, lam, rng)
        if batch.soft_targets is not None:
            y = batch.soft_targets.float()
        else:
            y = soft_labels(batch.targets, b, self.num_classes, self.ignore).to(x.device)
        y = y * lam + y[perm] * (1.0 - lam)
        weights = batch.weights
        if weights is not None:
            weights = weights * lam + weights[perm] * (1.0 - lam)
        return Batch(
            inputs=mixed, targets=None, index=batch.index, raw=batch.raw, weights=weights, soft_targets=y
        )


def _cutmix(x: Tensor, perm: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Pastes a box of area about (1 - lam) from x[perm] into x: over the last two dimensions (an
    image's H, W; a spectrogram's frequency, time), or a segment of the last one for (B, D) inputs.
    Returns the mixed inputs and lam recomputed from the box actually pasted."""
    out = x.clone()
    if x.dim() >= 3:
        h, w = x.shape[-2], x.shape[-1]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
        out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        area = (y1 - y0) * (x1 - x0) / (h * w)
    else:
        d = x.shape[-1]
        cd = int(round(d * (1.0 - lam)))
        c = int(rng.integers(d))
        a0, a1 = max(c - cd // 2, 0), min(c + (cd - cd // 2), d)
        out[..., a0:a1] = x[perm][..., a0:a1]
        area = (a1 - a0) / d
    return out, 1.0 - area
