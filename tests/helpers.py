"""Small shared builders for the test suite."""

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 96, classes: int = 3, dim: int = 8, seed: int = 0) -> TensorDataset:
    """Separable Gaussian blobs (fixed centres; `seed` draws the samples): learnt in a few steps."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def tiny_recipe(tmp_path, **over):
    """The digits recipe shrunk to seconds."""
    from distill.config import RecipeConfig, apply_overrides, parse_recipe

    data = RecipeConfig().model_dump(mode="json")
    flat = {
        "trainer.epochs": 2,
        "teacher.train.epochs": 2,
        "student.init_args.hidden": [16],
        "teacher.init_args.channels": [8, 16],
        "report.latency_repeats": 2,
        "trainer.tensorboard": False,
        "teacher.train.tensorboard": False,
        **over,
    }
    return parse_recipe(apply_overrides(data, [f"{k}={v}" for k, v in flat.items()]))
