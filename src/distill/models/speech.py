"""Keyword-spotting models on log-mel features (B, 1, n_mels, frames): a CNN teacher and a
depthwise-separable CNN student."""

from __future__ import annotations

from torch import Tensor, nn

from distill.errors import DistillError
from distill.registry import MODELS


def _as_image(x: Tensor) -> Tensor:
    if x.dim() == 3:  # (B, n_mels, frames) -> (B, 1, n_mels, frames)
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DistillError(f"speech models take (B, 1, n_mels, frames) features, got shape {tuple(x.shape)}")
    return x


class _Normalise(nn.Module):
    """Per-utterance mean/variance normalisation of the log-mel input (no learned statistics),
    so loudness and the noise floor of a recording do not shift the features."""

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(dim=(-2, -1), keepdim=True)
        sd = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
        return (x - mu) / sd


@MODELS.register("speech_cnn")
class SpeechCNN(nn.Module):
    """A VGG-style CNN teacher: three stages of two 3x3 conv-BN-ReLU layers, max-pooled, then a
    global average pool and a linear classifier (about 1.1M parameters at width 64).

    Args:
        num_classes: words to recognise.
        width: channels of the first stage (doubled at each stage).
        dropout: before the classifier.
    """

    def __init__(self, num_classes: int = 18, width: int = 64, dropout: float = 0.2):
        super().__init__()
        if num_classes < 2 or width < 1:
            raise DistillError(
                f"speech_cnn needs num_classes >= 2 and width >= 1, got {num_classes}, {width}"
            )
        layers: list[nn.Module] = [_Normalise()]
        c_in = 1
        for stage in range(3):
            c = width * 2**stage
            for _ in range(2):
                layers += [
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, frames) -> (B, num_classes) logits."""
        return self.classifier(self.pool(self.features(_as_image(x))))


class _DSBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


@MODELS.register("ds_cnn")
class DSCNN(nn.Module):
    """The depthwise-separable CNN of Zhang et al. (2017), "Hello Edge: Keyword Spotting on
    Microcontrollers": a strided 10x4 convolution, `blocks` depthwise 3x3 + pointwise 1x1 pairs,
    global average pool, linear (about 23k parameters at width 64, 4 blocks).

    Args:
        num_classes: words to recognise.
        width: channels throughout.
        blocks: depthwise-separable blocks.
    """

    def __init__(self, num_classes: int = 18, width: int = 64, blocks: int = 4, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2 or width < 1 or blocks < 0:
            raise DistillError(
                f"ds_cnn needs num_classes >= 2, width >= 1, blocks >= 0; got {num_classes}, {width}, {blocks}"
            )
        self.stem = nn.Sequential(
            _Normalise(),
            nn.Conv2d(1, width, (10, 4), stride=2, padding=(5, 1), bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[_DSBlock(width) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, frames) -> (B, num_classes) logits."""
        return self.classifier(self.pool(self.blocks(self.stem(_as_image(x)))))
