"""Datasets: bundled offline sets, generic loaders, and the contract a recipe's data follows."""

from distill.data import cifar  # noqa: F401  (registers cifar100, cifar100_standin)
from distill.data.bundle import DataBundle, build_data
from distill.data.digits import digits
from distill.data.indexed import IndexedDataset, indexed

__all__ = ["DataBundle", "IndexedDataset", "build_data", "digits", "indexed"]
