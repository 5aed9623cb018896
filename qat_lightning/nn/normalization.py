"""The normalization layer types, as torch's public classes.

torch's common bases of these classes (``torch.nn.modules.batchnorm._BatchNorm`` and ``_NormBase``) are private,
so the layers are listed by their public names; ``tests/test_normalization.py`` fails when torch adds a class
under those bases that is missing here.
"""

from __future__ import annotations

from torch import nn

BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
"""Layers that normalize with batch statistics in training and running statistics in eval mode."""

INSTANCE_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)

NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = BATCH_NORM_TYPES + INSTANCE_NORM_TYPES + (nn.LayerNorm, nn.GroupNorm)
"""Every normalization layer: none of them is quantized (BatchNorm folds into the layer before it)."""
