"""The output padding a transposed convolution uses to produce a requested output size.

``ConvTranspose{1,2,3}d.forward(input, output_size)`` picks, per spatial dimension, the output padding that turns
the smallest output the stride allows into ``output_size``. A layer that computes the same convolution with other
operands (a fake-quantized weight, a recomputed input) needs that number too; torch computes it in a private
method, so it is written out here from the documented output-size formula (``torch.nn.ConvTranspose2d``, "Shape").
"""

from __future__ import annotations

from collections.abc import Sequence

from qat_lightning.nn.convolution_types import ConvTranspose


def output_padding(layer: ConvTranspose, input_shape: Sequence[int], output_size: Sequence[int] | None) -> list[int]:
    """The ``output_padding`` per spatial dimension for which ``layer`` maps ``input_shape`` to ``output_size``.

    Args:
        layer: a ConvTranspose1d/2d/3d (its stride, padding, dilation, kernel size and ``output_padding``).
        input_shape: ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``.
        output_size: the spatial output size (``len(spatial)`` values, or the full output shape whose leading
            batch/channel sizes are ignored); ``None``: ``layer.output_padding``.

    Raises:
        ValueError: ``output_size`` has the wrong length, or a size outside the range the stride allows (the
            message gives the allowed range).
    """
    spatial = len(layer.kernel_size)
    if output_size is None:
        return list(layer.output_padding)
    leading = len(input_shape) - spatial
    sizes = list(output_size)
    if len(sizes) == leading + spatial:
        sizes = sizes[leading:]
    if len(sizes) != spatial:
        raise ValueError(
            f"{type(layer).__name__}: output_size must have {spatial} spatial sizes (or {leading + spatial} values "
            f"for a {len(input_shape)}-D input), got {list(output_size)}."
        )
    smallest = [
        (input_shape[leading + d] - 1) * layer.stride[d]
        - 2 * layer.padding[d]
        + layer.dilation[d] * (layer.kernel_size[d] - 1)
        + 1
        for d in range(spatial)
    ]
    largest = [size + stride - 1 for size, stride in zip(smallest, layer.stride, strict=True)]
    if any(not low <= size <= high for size, low, high in zip(sizes, smallest, largest, strict=True)):
        raise ValueError(
            f"{type(layer).__name__}: requested output_size {sizes}, but for an input of spatial size "
            f"{list(input_shape[leading:])} the valid sizes range from {smallest} to {largest}; pass a size in "
            "that range."
        )
    return [size - low for size, low in zip(sizes, smallest, strict=True)]
