"""Reference models, registered by short name in `distill.registry.MODELS`."""

from distill.models.small import MLP, SmallCNN

__all__ = ["MLP", "SmallCNN"]
