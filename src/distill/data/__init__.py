"""Datasets: bundled offline sets, generic loaders, and the contract a recipe's data follows."""

from distill.data.bundle import DataBundle, build_data
from distill.data.digits import digits

__all__ = ["DataBundle", "build_data", "digits"]
