"""Tiny models for the demo and the test suite: they train in seconds on two CPU cores."""

from __future__ import annotations

from torch import Tensor, nn

from distill.registry import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
    """Flatten, then `hidden` fully connected layers with ReLU (and dropout), then the classifier.

    Args:
        in_features: size of one flattened input (64 for 8x8 digits).
        num_classes: outputs.
        hidden: widths of the hidden layers.
        dropout: after each hidden layer.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: tuple[int, ...] = (128,),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("cnn")
class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (a 2x2 max-pool after every block but the last), global average pool,
    linear classifier. Sized by `channels`, e.g. (32, 64, 128) for a teacher on 8x8 digits.

    Args:
        in_channels: input channels.
        num_classes: outputs.
        channels: output channels of each block.
        dropout: before the classifier.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64),
        dropout: float = 0.0,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for i, out in enumerate(channels):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)
                )
            )
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
