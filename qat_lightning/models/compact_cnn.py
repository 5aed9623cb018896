"""``CompactCNN``: a VGG-style CNN of a few 3x3 conv stages, the model of the glyphs benchmark."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from qat_lightning.models.weights import load_weights


class CompactCNN(nn.Module):
    """Stages of ``convs_per_stage`` 3x3 conv-BatchNorm-ReLU blocks, a 2x2 max-pool between stages, global
    average pooling and a linear classifier (with the defaults: 6 convolutions, 73 k parameters, 9.6 M
    multiply-accumulates per 32x32 image).

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        channels: output channels of each stage (one stage per entry).
        convs_per_stage: convolutions in each stage.
        weights_path: optional local file to load (a state dict, or a Lightning checkpoint of an
            ``ImageClassifier``, e.g. the float run of ``configs/glyphs_fp32.yaml`` that a QAT run starts from);
            see ``load_weights``.

    Shapes: input ``(N, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``2 ** (len(channels) - 1)``,
    output ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 12,
        channels: Sequence[int] = (16, 32, 64),
        convs_per_stage: int = 2,
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("`channels` must name at least one stage, got an empty sequence.")
        if isinstance(convs_per_stage, bool) or not isinstance(convs_per_stage, int) or convs_per_stage < 1:
            raise ValueError(f"`convs_per_stage` must be a positive integer, got {convs_per_stage!r}.")
        layers: list[nn.Module] = []
        width = in_channels
        for stage, out in enumerate(channels):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                width = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        if weights_path is not None:
            load_weights(self, weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
