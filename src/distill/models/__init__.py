"""Reference models, registered by short name in `distill.registry.MODELS`."""

from distill.models import cifar  # noqa: F401  (registers the CIFAR benchmark networks)
from distill.models.small import MLP, SmallCNN

__all__ = ["MLP", "SmallCNN"]
