"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): real data, offline."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data.bundle import DataBundle
from distill.errors import DistillError
from distill.registry import DATASETS


class DigitsSplit(Dataset):
    """Images (1, 8, 8) scaled to [0, 1], labels 0-9. With `shift > 0`, each access shifts the image
    by up to `shift` pixels in x and y (zero fill), drawn from torch's global RNG so a seeded run
    sees the same views; teacher and student see the same shifted view of a batch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, shift: int = 0):
        self.x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.shift = shift

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.shift:
            dx, dy = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = _shift(x, dx, dy)
        return x, self.y[i]


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


@DATASETS.register("digits")
def digits(
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    train_limit: int | None = None,
    shift: int = 0,
    split_seed: int = 0,
    seed: int = 0,
) -> DataBundle:
    """Stratified train/val/test split of `sklearn.datasets.load_digits`.

    Args:
        val_fraction, test_fraction: shares of the 1,797 images held out.
        train_limit: keep only this many training images (stratified), to study low-data regimes.
        shift: random-translation augmentation of the training split, in pixels.
        split_seed: the split is fixed by this, not by the run's seed, so seeds compare training only.
        seed: the run's seed (unused: the split stays put across seeds).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DistillError(
            f"digits: val_fraction {val_fraction} + test_fraction {test_fraction} must leave "
            "a training split (each in (0, 1), sum < 1)"
        )
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    x_tr, x_val, y_tr, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest, random_state=split_seed
    )
    if train_limit is not None:
        if train_limit < 10 or train_limit > len(y_tr):
            raise DistillError(f"digits: train_limit {train_limit} must be in [10, {len(y_tr)}]")
        if train_limit < len(y_tr):
            x_tr, _, y_tr, _ = train_test_split(
                x_tr, y_tr, train_size=train_limit, stratify=y_tr, random_state=split_seed
            )
    return DataBundle(
        train=DigitsSplit(x_tr, y_tr, shift=shift),
        val=DigitsSplit(x_val, y_val),
        test=DigitsSplit(x_test, y_test),
        num_classes=10,
        input_shape=(1, 8, 8),
        meta={
            "source": "sklearn.datasets.load_digits",
            "train": len(y_tr),
            "val": len(y_val),
            "test": len(y_test),
        },
    )
