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
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

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
    box, area = _box(x.shape[1:], lam, rng)
    out = x.clone()
    out[box] = x[perm][box]
    return out, 1.0 - area


def _box(shape: Sequence[int], lam: float, rng: np.random.Generator) -> tuple[tuple, float]:
    """Where cutmix pastes for one sample of `shape` (no batch dimension): the index of a box of
    area about (1 - lam) over the last two dimensions (or a segment of the only one), and its area
    as a share of the whole."""
    if len(shape) >= 2:
        h, w = shape[-2], shape[-1]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
        return (..., slice(y0, y1), slice(x0, x1)), (y1 - y0) * (x1 - x0) / (h * w)
    d = shape[-1]
    cd = int(round(d * (1.0 - lam)))
    c = int(rng.integers(d))
    a0, a1 = max(c - cd // 2, 0), min(c + (cd - cd // 2), d)
    return (..., slice(a0, a1)), (a1 - a0) / d


class MixedViews(Dataset):
    """`views` fixed mixed versions of every sample, for a teacher served from a store.

    A store of the teacher's outputs at the unmixed inputs cannot give its view of a mixed input,
    and batch mixing (`Mixer`) pairs whatever samples share a batch, so no mixed input repeats. Here
    mixing is per sample and seeded: view `v` of sample `i` (store row `r = v * n + i`) pastes (cutmix)
    or blends (mixup) sample `perm_v[i]` into sample `i` with `lam` drawn from `(seed, r)`, every
    input read as the seeded augmented view `r` of `AugmentedCopies`. So the teacher's output on each
    of the `views * n` mixed inputs can be stored once, and epoch `e` trains on view `e mod views`:
    offline function matching (Beyer et al. 2022, the "fixed teacher" with precomputed views).

    Items are dicts: `inputs`, `soft_targets` (C,) (`lam * onehot(y_i) + (1 - lam) * onehot(y_j)`, zero
    rows for unlabelled samples, as `Mixer` makes them) and `index`, the store row. `rows()` is the
    `views * n` rows in order, without an index: what `write_store` runs the teacher over.
    """

    def __init__(self, dataset: Any, views: int, mixer: Mixer):
        """`mixer`: the mixing settings (name, alpha, prob, classes, seed, ignored labels)."""
        from distill.teachers.store import AugmentedCopies, is_random

        if views < 1:
            raise ConfigError(f"the number of mixed views must be at least 1, got {views}")
        seed = mixer.seed
        self.dataset, self.copies = dataset, AugmentedCopies(dataset, views, seed)
        self.n, self.views = len(dataset), views
        self.name, self.alpha, self.prob = mixer.name, mixer.alpha, mixer.prob
        self.num_classes, self.seed, self.ignore = mixer.num_classes, seed, mixer.ignore
        # seeding every read costs ~0.3 ms; a dataset without random augmentation needs none
        self._read = self.copies.read if is_random(dataset) else (lambda r: dataset[r % self.n])
        self.epoch = 0
        self._perms: dict[int, np.ndarray] = {}
        # what the store's fingerprint shows as the input transform (see `transform_repr`)
        self.transform = (
            f"{self.name}(alpha={self.alpha:g}, prob={self.prob:g}) x {views} fixed views, seed {seed}"
        )

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this before each epoch: epoch `e` reads view `e mod views`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = (self.epoch % self.views) * self.n + i
        return {**self.row(r), "index": r}

    def _partner(self, view: int, i: int) -> int:
        if view not in self._perms:
            self._perms[view] = np.random.default_rng([self.seed, view, 0x76696577]).permutation(self.n)
        return int(self._perms[view][i])

    def row(self, r: int) -> dict[str, Any]:
        """Mixed input `r` (view `r // n` of sample `r % n`), the same tensor on every read."""
        view, i = divmod(r, self.n)
        x, y = _pair(self._read(r))
        rng = np.random.default_rng([self.seed, r, 0x6D6978])
        labels = self._onehot(y)
        if rng.random() >= self.prob:
            return {"inputs": x, "soft_targets": labels}
        check_mixable(x.unsqueeze(0), self.name)
        x2, y2 = _pair(self._read(view * self.n + self._partner(view, i)))
        lam = float(rng.beta(self.alpha, self.alpha))
        if self.name == "mixup":
            mixed = x * lam + x2 * (1.0 - lam)
        else:
            box, area = _box(x.shape, lam, rng)
            mixed, lam = x.clone(), 1.0 - area
            mixed[box] = x2[box]
        return {"inputs": mixed, "soft_targets": labels * lam + self._onehot(y2) * (1.0 - lam)}

    def _onehot(self, y: int) -> Tensor:
        out = torch.zeros(self.num_classes)
        if 0 <= y < self.num_classes:
            out[y] = 1.0
        elif y not in self.ignore:
            raise DistillError(f"label {y} is out of range for {self.num_classes} classes")
        return out

    def rows(self) -> Dataset:
        return _Rows(self)


class _Rows(Dataset):
    """Every mixed view of `MixedViews`, `views * n` items in store order."""

    def __init__(self, views: MixedViews):
        self.dataset = views  # (its transform names the mixing, for the store's fingerprint)

    def __len__(self) -> int:
        return self.dataset.views * self.dataset.n

    def __getitem__(self, r: int) -> dict[str, Any]:
        return self.dataset.row(r)


def _pair(item: Any) -> tuple[Tensor, Any]:
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], int(item[1])
    raise ConfigError(
        f"mixed views of a teacher store need (input, label) samples, got {type(item).__name__}; "
        "set trainer.mix.name: none"
    )
