"""The convolution layer types, as torch's public classes.

torch's common bases of these classes (``torch.nn.modules.conv._ConvNd`` and ``_ConvTransposeNd``) are private, so
the layers are listed by their public names; the lazy variants are subclasses of them (``nn.LazyConv2d`` is an
``nn.Conv2d``). ``tests/test_convolution_types.py`` fails when torch adds a class under those bases that these
tuples do not cover.
"""

from __future__ import annotations

from torch import nn

CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""Transposed convolutions: weight ``(in_channels, out_channels / groups, *kernel)``."""

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + CONV_TRANSPOSE_TYPES
"""Every convolution, transposed or not: weight ``(out_channels, in_channels / groups, *kernel)`` unless
transposed."""

Convolution = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
"""A layer of ``CONV_TYPES``, for type hints."""

ConvTranspose = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
"""A layer of ``CONV_TRANSPOSE_TYPES``, for type hints."""
