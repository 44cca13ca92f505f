"""The CIFAR networks the knowledge-distillation literature reports on (CRD, DKD and their
successors benchmark teacher → student pairs among these), for 32×32 inputs.

Every model takes `num_classes` (default 100), returns logits only, and ends in a module
`avgpool` (the pooled penultimate features, (B, C, 1, 1)) followed by the classifier, so
feature and relation losses tap blocks and the embedding by module path. The architectures
follow the papers' descriptions as used in those benchmarks (e.g. the ×4 ResNets have stage
widths 32-64-128-256, MobileNetV2 is the half-width one, the VGGs use batch norm), so parameter
counts match the published ones (checked in `tests/test_cifar_models.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.registry import MODELS


def _conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, the CIFAR variant: three stages of basic blocks, depth = 6n + 2)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            _conv_bn(cin, cout, k=1, stride=stride, relu=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: a 3×3 stem, stages `layer1..layer3` of (depth − 2) / 6 basic blocks with
    strides 1, 2, 2.

    Args:
        depth: 6n + 2 (8, 20, 32, 56, 110, ...).
        widths: stem width then the three stage widths (16-16-32-64; ×4 nets: 32-64-128-256).
        num_classes: size of the classifier.
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise DistillError(f"CIFAR ResNet depth must be 6n + 2 (8, 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        w = list(widths)
        self.conv1 = _conv_bn(3, w[0])

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            )

        self.layer1 = stage(w[0], w[1], 1)
        self.layer2 = stage(w[1], w[2], 2)
        self.layer3 = stage(w[2], w[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


@MODELS.register("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, num_classes=num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, num_classes=num_classes)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, num_classes=num_classes)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, depth = 6n + 4, width ×k


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k: a 3×3 stem to 16 channels, stages `block1..block3` of (depth − 4) / 6
    blocks at widths 16k, 32k, 64k (strides 1, 2, 2), then BN-ReLU, `avgpool`, `fc`."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise DistillError(f"WideResNet depth must be 6n + 4 (10, 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1, bias=False)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            )

        self.block1 = stage(w[0], w[1], 1)
        self.block2 = stage(w[1], w[2], 2)
        self.block3 = stage(w[2], w[3], 2)
        self.bn = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        _init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)


# ---------------------------------------------------------------------------------------------
# VGG with batch norm (Simonyan & Zisserman 2015), the CIFAR variant: five conv blocks, max-pool
# after the first three, global average pooling and one linear classifier


_VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    """Blocks `block0..block4` (3×3 conv + BN + ReLU each; a 2×2 max-pool after blocks 0-2),
    `avgpool`, `fc`. Biases on convs, as in the benchmarks' VGGs."""

    def __init__(self, depth: int, num_classes: int = 100):
        super().__init__()
        if depth not in _VGG_CFG:
            raise DistillError(f"VGG depth must be one of {sorted(_VGG_CFG)}, got {depth}")
        cin = 3
        blocks = []
        for widths in _VGG_CFG[depth]:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.block0(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.block4(self.block3(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(8, num_classes)


@MODELS.register("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(11, num_classes)


@MODELS.register("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(13, num_classes)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), CIFAR variant at half width


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise 3×3 → project (1×1, linear); residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            _conv_bn(cin, hidden, k=1),
            _conv_bn(hidden, hidden, k=3, stride=stride, groups=hidden),
            _conv_bn(hidden, cout, k=1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32×32 inputs: stride-2 stem, seven stages `stages.0..6`
    (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
    (6,320,1,1) — the second stage keeps stride 1 for the small images — channel counts
    times `width`, a 1×1 conv to 1280 channels (`head`), `avgpool`, `fc`.
    The KD benchmarks' "MobileNetV2" is `width=0.5`.
    """

    SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, width: float = 0.5, num_classes: int = 100, expand: int = 6):
        super().__init__()
        cin = int(32 * width)
        self.stem = _conv_bn(3, cin, stride=2)
        stages = []
        for t, c, n, s in self.SETTING:
            cout = int(c * width)
            t = expand if t != 1 else 1
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        last = int(1280 * width) if width > 1.0 else 1280
        self.head = _conv_bn(cin, last, k=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("MobileNetV2")
def mobilenetv2(num_classes: int = 100, width: float = 0.5) -> MobileNetV2:
    return MobileNetV2(width=width, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018), CIFAR variants


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1 → shuffle → depthwise 3×3 → grouped 1×1; add (stride 1) or concatenate
    with an average-pooled shortcut (stride 2)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        g1 = 1 if cin == 24 else groups  # the first unit's input (the stem) is too thin to group
        self.groups, self.stride = g1, stride
        self.conv1 = _conv_bn(cin, mid, k=1, groups=g1)
        self.conv2 = _conv_bn(mid, mid, k=3, stride=stride, groups=mid, relu=False)
        self.conv3 = _conv_bn(mid, cout, k=1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.groups)))
        if self.shortcut is not None:
            return self.relu(torch.cat([out, self.shortcut(x)], 1))
        return self.relu(out + x)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 (g = 3) for 32×32: a 1×1 stem to 24 channels, stages `layer1..layer3`
    of 4, 8, 4 units reaching 240, 480, 960 channels, `avgpool`, `fc`."""

    def __init__(
        self,
        num_classes: int = 100,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks=(4, 8, 4),
        groups: int = 3,
    ):
        super().__init__()
        self.stem = _conv_bn(3, 24, k=1)
        cin = 24
        layers = []
        for cout, n in zip(out_planes, num_blocks):
            units = []
            for i in range(n):
                # A stride-2 unit concatenates its input, so it only produces cout − cin channels.
                units.append(ShuffleV1Unit(cin, cout - cin if i == 0 else cout, 2 if i == 0 else 1, groups))
                cin = cout
            layers.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("ShuffleNetV1")
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes)


class ShuffleV2Unit(nn.Module):
    """Stride 1: split channels in half, transform one half (1×1, depthwise 3×3, 1×1), concatenate,
    shuffle. Stride 2 (downsampling): both branches see the whole input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        if stride == 1:
            half = cin // 2
            self.branch = nn.Sequential(
                _conv_bn(half, half, k=1),
                _conv_bn(half, half, k=3, groups=half, relu=False),
                _conv_bn(half, half, k=1),
            )
        else:
            mid = cout // 2
            self.left = nn.Sequential(
                _conv_bn(cin, cin, k=3, stride=2, groups=cin, relu=False),
                _conv_bn(cin, mid, k=1),
            )
            self.branch = nn.Sequential(
                _conv_bn(cin, mid, k=1),
                _conv_bn(mid, mid, k=3, stride=2, groups=mid, relu=False),
                _conv_bn(mid, mid, k=1),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        else:
            out = torch.cat([self.left(x), self.branch(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 (1×) for 32×32: a 3×3 stem to 24 channels, stages `layer1..layer3`
    (a downsampling unit then 3, 7, 3 units) at 116, 232, 464 channels, a 1×1 conv to 1024
    (`head`), `avgpool`, `fc`."""

    def __init__(
        self, num_classes: int = 100, widths: Sequence[int] = (116, 232, 464, 1024), num_blocks=(3, 7, 3)
    ):
        super().__init__()
        self.stem = _conv_bn(3, 24)
        cin = 24
        layers = []
        for cout, n in zip(widths[:3], num_blocks):
            units = [ShuffleV2Unit(cin, cout, 2)] + [ShuffleV2Unit(cout, cout, 1) for _ in range(n)]
            layers.append(nn.Sequential(*units))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.head = _conv_bn(cin, widths[3], k=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("ShuffleNetV2")
def shufflenetv2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes)


CIFAR_MODELS = (
    "resnet8",
    "resnet8x4",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet56",
    "resnet110",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
)
