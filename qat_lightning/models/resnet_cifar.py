"""ResNet for CIFAR (He et al., 2016, section 4.2): 6n+2 layers, 16-32-64 channels; ResNet-20 has 0.27 M parameters."""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from qat_lightning.models.weights import load_weights


class CifarResNet(nn.Module):
    """A 3x3 stem convolution (16 channels), three stages of ``blocks_per_stage`` torchvision ``BasicBlock``s
    (16, 32 and 64 channels; the 2nd and 3rd stages halve the resolution), global average pooling and a
    linear classifier. Where a block changes shape, its shortcut is a strided 1x1 convolution with BatchNorm
    (the paper's option B, as in torchvision's ResNets).

    Args:
        blocks_per_stage: residual blocks per stage (``n``; the depth is ``6n + 2``).
        num_classes: number of output logits.

    Shapes: input ``(N, 3, H, W)`` (32x32 for CIFAR), output ``(N, num_classes)`` logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_cifar(depth: int, num_classes: int = 10, weights_path: str | os.PathLike | None = None) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110, ...).

    Args:
        depth: number of weighted layers (convolutions on the main path plus the classifier).
        num_classes: number of output logits.
        weights_path: optional local file to load (a state dict, or a Lightning checkpoint of an
            ``ImageClassifier``, e.g. the float run that a QAT run starts from); see ``load_weights``.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}.")
    model = CifarResNet((depth - 2) // 6, num_classes)
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def resnet20(num_classes: int = 10, weights_path: str | os.PathLike | None = None) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27 M parameters); see ``resnet_cifar``."""
    return resnet_cifar(20, num_classes, weights_path)
