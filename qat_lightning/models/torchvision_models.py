"""torchvision's MobileNetV2 and ResNet-18, built without downloading anything; local weights files load."""

from __future__ import annotations

import os
from typing import TypeVar

from torch import nn
from torchvision import models

from qat_lightning.models.weights import load_weights

Model = TypeVar("Model", bound=nn.Module)


def _load(model: Model, weights_path: str | os.PathLike | None, release: models.WeightsEnum) -> Model:
    if weights_path is None:
        return model
    hint = (
        f"torchvision's ImageNet weights ({release}) are at {release.url}: download the file on a machine with "
        "internet access and pass its path as `weights_path`."
    )
    load_weights(model, weights_path, hint=hint)
    return model


def mobilenet_v2(
    num_classes: int = 1000, width_mult: float = 1.0, weights_path: str | os.PathLike | None = None
) -> models.MobileNetV2:
    """torchvision's MobileNetV2 (randomly initialised), optionally loading a local weights file.

    Args:
        num_classes: number of output logits (torchvision's ImageNet weights have 1000).
        width_mult: channel multiplier of every layer.
        weights_path: a state dict file (e.g. torchvision's ``mobilenet_v2-b0353104.pth``) or a Lightning
            checkpoint of an ``ImageClassifier``; see ``load_weights``.
    """
    model = models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    return _load(model, weights_path, models.MobileNet_V2_Weights.IMAGENET1K_V1)


def resnet18(num_classes: int = 1000, weights_path: str | os.PathLike | None = None) -> models.ResNet:
    """torchvision's ResNet-18 (randomly initialised), optionally loading a local weights file.

    Args:
        num_classes: number of output logits (torchvision's ImageNet weights have 1000).
        weights_path: a state dict file (e.g. torchvision's ``resnet18-f37072fd.pth``) or a Lightning
            checkpoint of an ``ImageClassifier``; see ``load_weights``.
    """
    model = models.resnet18(weights=None, num_classes=num_classes)
    return _load(model, weights_path, models.ResNet18_Weights.IMAGENET1K_V1)
