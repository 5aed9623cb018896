"""``transposed_padding.output_padding`` against what torch's ConvTranspose layers produce for every valid size."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from qat_lightning.nn.fake_quantized import conv_transpose
from qat_lightning.nn.transposed_padding import output_padding

LAYERS = {
    1: lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1, dilation=2),
    2: lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 0)),
    3: lambda: nn.ConvTranspose3d(2, 1, 2, stride=2, padding=0),
}


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_every_valid_output_size_matches_the_layer(spatial: int, batched: bool) -> None:
    torch.manual_seed(spatial)
    layer = LAYERS[spatial]()
    x = torch.randn(*((2,) if batched else ()), 2, *[4] * spatial)
    default = layer(x)
    # The sizes the stride allows: the default (smallest, with no output padding) plus up to stride - 1.
    smallest = [n - p for n, p in zip(default.shape[-spatial:], layer.output_padding, strict=True)]
    for extra in itertools.product(*[range(s) for s in layer.stride]):
        size = [n + e for n, e in zip(smallest, extra, strict=True)]
        padding = output_padding(layer, x.shape, size)
        assert padding == list(extra)
        expected = layer(x, size)
        assert list(expected.shape[-spatial:]) == size
        torch.testing.assert_close(conv_transpose(layer, x, layer.weight, size), expected, rtol=0, atol=0)
    full_shape = list(default.shape)  # the whole output shape, as ``forward`` also accepts
    assert output_padding(layer, x.shape, full_shape) == list(layer.output_padding)
    assert output_padding(layer, x.shape, None) == list(layer.output_padding)


def test_out_of_range_size_names_the_valid_range() -> None:
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 2, 5, 5)  # smallest output 9, largest 10
    with pytest.raises(ValueError, match=r"valid sizes range from \[9, 9\] to \[10, 10\]"):
        output_padding(layer, x.shape, [11, 9])
    with pytest.raises(ValueError, match=r"valid sizes range"):
        layer(x, [11, 9])  # torch refuses the same size


def test_wrong_length_names_the_expected_count() -> None:
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2)
    with pytest.raises(ValueError, match="must have 2 spatial sizes"):
        output_padding(layer, (1, 2, 5, 5), [11])
