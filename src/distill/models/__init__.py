"""Reference models, registered by short name in `distill.registry.MODELS`."""

from distill.models import cifar  # noqa: F401  (registers the CIFAR benchmark networks)
from distill.models.small import MLP, SmallCNN
from distill.registry import MODELS

MODELS.add_lazy("speech_cnn", "distill.models.speech.SpeechCNN")
MODELS.add_lazy("ds_cnn", "distill.models.speech.DSCNN")
MODELS.add_lazy("detector", "distill.detection.build_detector")  # torchvision, imported on use

__all__ = ["MLP", "SmallCNN"]
