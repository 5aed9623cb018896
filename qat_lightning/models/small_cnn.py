"""The small CNN of the weight-normalization write-up: (conv-BN-ReLU-maxpool) x 2, then one linear layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool) and a linear classifier.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        input_size: height (= width) of the input images in pixels; must be divisible by 4.
        channels: output channels of the two conv blocks.
        weight_norm: reparametrize the weight of every conv and linear layer as ``g * v / ||v||`` per output
            channel (``torch.nn.utils.parametrizations.weight_norm``), as in the weight-normalization write-up.

    Shapes: input ``(N, in_channels, input_size, input_size)``, output ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        channels: tuple[int, int] = (16, 32),
        weight_norm: bool = False,
    ) -> None:
        super().__init__()
        if input_size % 4:
            raise ValueError(f"`input_size` must be divisible by 4 (two 2x2 poolings), got {input_size}.")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * (input_size // 4) ** 2, num_classes)
        if weight_norm:
            for layer in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
                apply_weight_norm(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
