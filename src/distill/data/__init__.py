"""Datasets: bundled offline sets, generic loaders, and the contract a recipe's data follows."""

from distill.data.bundle import DataBundle, build_data
from distill.data.digits import digits
from distill.registry import DATASETS

# Generated sets whose code needs optional extras (torchvision / librosa): imported on first use.
DATASETS.add_lazy("shapes", "distill.data.shapes.shapes_data")
DATASETS.add_lazy("speech_words", "distill.data.speech.speech_data")

__all__ = ["DataBundle", "build_data", "digits"]
