"""The public convolution classes stand in for torch's private bases: this fails when torch adds one."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.convert.backends.executorch import signal_padding
from qat_lightning.nn import plan_quantization
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES, CONV_TYPES


def _public_subclasses(base: type) -> set[type]:
    return {cls for _, cls in inspect.getmembers(nn, inspect.isclass) if issubclass(cls, base) and cls is not base}


def test_every_public_convolution_of_torch_is_covered():
    conv = pytest.importorskip("torch.nn.modules.conv")  # the private module: a rename fails below
    convolutions = _public_subclasses(conv._ConvNd)
    transposed = _public_subclasses(conv._ConvTransposeNd)
    assert len(convolutions) >= 12 and len(transposed) >= 6  # Conv/ConvTranspose 1-3d and their lazy variants
    assert all(issubclass(cls, CONV_TYPES) for cls in convolutions)
    assert all(issubclass(cls, CONV_TRANSPOSE_TYPES) for cls in transposed)
    assert not any(issubclass(cls, CONV_TRANSPOSE_TYPES) for cls in convolutions - transposed)


def test_transposed_convolutions_quantize_along_their_output_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Conv1d(6, 2, 1))
    axes = {p.name: p.weight.channel_axis for p in plan_quantization(model, 8, first_last_bits=None)}
    assert axes == {"0": 0, "2": 1, "3": 0}


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular", "zeros"])
@pytest.mark.parametrize(
    ("padding", "kernel_size", "dilation"), [(2, 3, 1), ("same", 4, 1), ("same", 3, 2), ("valid", 3, 1)]
)
def test_signal_padding_pads_as_the_convolution_does(padding, kernel_size, dilation, padding_mode):
    conv = nn.Conv1d(2, 3, kernel_size, padding=padding, dilation=dilation, padding_mode=padding_mode)
    x = torch.randn(2, 2, 9)
    left, right = signal_padding(conv)
    padded = F.pad(x, (left, right), mode="constant" if padding_mode == "zeros" else padding_mode)
    expected = conv(x)
    torch.testing.assert_close(F.conv1d(padded, conv.weight, conv.bias, dilation=dilation), expected)
    assert expected.shape[-1] == 9 - dilation * (kernel_size - 1) + left + right
