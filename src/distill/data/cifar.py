"""CIFAR-100 for the KD benchmarks, and a generated stand-in with the same shapes for tests.

CIFAR is not bundled and nothing is downloaded: `cifar100` reads torchvision's
`<root>/cifar-100-python` folder and says where to put it when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.registry import DATASETS

# Per-channel statistics of the CIFAR-100 training set, the normalisation the benchmarks use.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar100(root: str | Path = "data", train: bool = True, augment: bool | None = None):
    """torchvision's CIFAR-100, with the literature's transforms.

    Args:
        root: the folder holding `cifar-100-python/` (as torchvision extracts it).
        train: the 50,000-image training split, else the 10,000-image test split.
        augment: random 32×32 crop with 4-pixel padding + horizontal flip; default: `train`.

    Raises:
        DistillError: when the folder is missing, naming the path expected.
    """
    folder = Path(root) / "cifar-100-python"
    if not folder.is_dir():
        raise DistillError(
            f"CIFAR-100 not found: expected the folder {folder} (the 'python version' archive from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extracted there); set data.root to its parent"
        )
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise DistillError("CIFAR-100 needs torchvision: pip install 'distill[vision]'") from e
    augment = train if augment is None else augment
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    return datasets.CIFAR100(str(root), train=train, download=False, transform=transforms.Compose(steps))


def crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The CIFAR augmentation on a (C, H, W) tensor: zero-pad, random crop back, random flip."""
    c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    i, j = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,), generator=generator))
    out = padded[:, i : i + h, j : j + w]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    return out


class CifarStandIn(torch.utils.data.Dataset):
    """Generated 3×32×32 images in 100 (or `num_classes`) classes, for tests and demos where
    CIFAR is absent: each class is a fixed smooth random pattern, each image that pattern plus
    noise, normalised like CIFAR. Learnable, deterministic for a seed, held in memory.

    Args:
        n: number of images.
        num_classes: number of classes.
        train: selects an independent noise stream for the test split (same class patterns).
        augment: apply `crop_flip`; default: `train`.
        noise: noise level relative to the patterns.
        seed: the class patterns' seed.
    """

    def __init__(
        self,
        n: int = 512,
        num_classes: int = 100,
        train: bool = True,
        augment: bool | None = None,
        noise: float = 0.5,
        seed: int = 0,
    ):
        if n < 1 or num_classes < 2:
            raise DistillError(f"CifarStandIn needs n ≥ 1 and num_classes ≥ 2, got {n}, {num_classes}")
        g = torch.Generator().manual_seed(seed)
        # Smooth class patterns: 8×8 random maps upsampled to 32×32.
        coarse = torch.randn(num_classes, 3, 8, 8, generator=g)
        patterns = torch.nn.functional.interpolate(
            coarse, size=(32, 32), mode="bilinear", align_corners=False
        )
        g.manual_seed(seed * 2 + (1 if train else 2))
        self.targets = torch.randint(0, num_classes, (n,), generator=g)
        self.images = patterns[self.targets] + noise * torch.randn(n, 3, 32, 32, generator=g)
        self.images = (self.images - self.images.mean()) / self.images.std()
        self.augment = train if augment is None else augment
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.augment:
            x = crop_flip(x)
        return x, int(self.targets[i])


@DATASETS.register("cifar100")
def cifar100_data(root: str = "data", seed: int = 0):
    """CIFAR-100 as a recipe's data: train (augmented) and the test split, which also serves as
    `val` — CIFAR-100 has no validation split and the KD literature reports test accuracy."""
    from distill.data.bundle import DataBundle

    test = cifar100(root, train=False)
    return DataBundle(
        train=cifar100(root, train=True),
        val=test,
        test=test,
        num_classes=100,
        input_shape=(3, 32, 32),
        meta={"source": "cifar100", "root": str(root)},
    )


@DATASETS.register("cifar100_standin")
def cifar100_standin(n_train: int = 256, n_test: int = 128, num_classes: int = 100, seed: int = 0):
    """The generated `CifarStandIn` in CIFAR-100's shapes, for tests of the CIFAR recipes
    (`data.name=cifar100_standin`). The patterns are fixed (seed 0); `seed` is the run's."""
    from distill.data.bundle import DataBundle

    test = CifarStandIn(n_test, num_classes, train=False)
    return DataBundle(
        train=CifarStandIn(n_train, num_classes, train=True),
        val=test,
        test=test,
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        meta={"source": "cifar100_standin"},
    )
