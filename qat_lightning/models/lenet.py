"""LeNet-5 (LeCun et al., 1998) in its common modern form: ReLU activations and max-pooling."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """Two 5x5 conv layers (6 and 16 channels, each followed by ReLU and 2x2 max-pooling) and three linear
    layers (120, 84, ``num_classes``). The first convolution pads by 2, so 28x28 MNIST images give the
    original 16x5x5 feature map (61,706 parameters for 10 classes).

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        input_size: height (= width) of the input images in pixels, at least 12.

    Shapes: input ``(N, in_channels, input_size, input_size)``, output ``(N, num_classes)`` logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        side = (input_size // 2 - 4) // 2  # conv1 keeps the size, pool halves, conv2 removes 4, pool halves
        if side < 1:
            raise ValueError(
                f"`input_size` must be at least 12 pixels for LeNet-5's two 5x5 convolutions, got {input_size}."
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
