"""Reference models (small nets, CIFAR benchmark nets, speech CNNs, torchvision detectors), registered
by short name in `distill.registry.MODELS`. May import the contracts and `data`; nothing above."""

from distill.models import cifar  # noqa: F401  (registers the CIFAR benchmark networks)
from distill.models.small import MLP, SmallCNN
from distill.registry import MODELS

MODELS.add_lazy("speech_cnn", "distill.models.speech.SpeechCNN")
MODELS.add_lazy("ds_cnn", "distill.models.speech.DSCNN")
# Hugging Face models by folder or hub id (transformers, the [nlp] extra), imported on use.
MODELS.add_lazy("hf", "distill.nlp.hf_models.hf")
MODELS.add_lazy("detector", "distill.models.detection.build_detector")  # torchvision, imported on use
# Architectures by name from torchvision / timm (weights only from a local file): docs/your_data.md.
MODELS.add_lazy("torchvision", "distill.models.zoo.torchvision_model")
MODELS.add_lazy("timm", "distill.models.zoo.timm_model")

__all__ = ["MLP", "SmallCNN"]
