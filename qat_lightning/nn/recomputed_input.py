"""Convolutions on a rounded input that keep the input's source for the backward pass, not the rounded copy.

A fake-quantized convolution reads ``q = fake_quantize(x)``, a new tensor of the activation's size. Autograd keeps
``q`` for the weight gradient, while ``x`` (a ReLU output, kept by the ReLU and by the quantizer's own backward
pass) stays alive anyway: without this module QAT holds one extra activation per quantized layer input (ResNet-20,
batch 64: 149 MiB of saved tensors against 97 MiB in float).

``convolution`` saves ``x`` and the grid instead and recomputes ``q`` in the backward pass (one elementwise pass,
the same float32 operations, so the same values bit for bit), then calls ``aten.convolution_backward``, the
function autograd calls for a convolution, with the same arguments. Values and gradients are therefore those of
the plain convolution on ``q``; the rounding's own backward pass (straight-through or LSQ) is untouched, since ``q``
stays the input that receives the gradient. It works for any ``q`` that a ``FakeQuantizer`` records
(``FakeQuantizer.rounding_of``): a layer's own input quantizer, or one shared at the producer's output
(``input_sharing``).

It is used in eager differentiable calls (under autocast too: the input, weight and bias are cast as autocast casts
them for a convolution, and the cast input is recomputed as well), on batched inputs of at least
``rounding.MIN_RECOMPUTED_ELEMENTS`` values, for zero-padded convolutions with numeric padding, unless
``set_recompute(False)``; everything else (and ``torch.compile``/``torch.export`` traces, where the compiler plans
what to keep) takes the plain convolution. Recomputing costs about 0.07x of a float ResNet-20 step on a Xeon CPU
(``docs/qat_speed.md``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from qat_lightning.nn import transposed_padding
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES, Convolution
from qat_lightning.quant import FakeQuantizer
from qat_lightning.quant.rounding import Rounding


class _RecomputedInputConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rounded, source, scale, zero_point, quant_range, weight, bias, conv_args):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(source, scale, zero_point, weight)
        ctx.dtype = rounded.dtype  # that of the rounding, or the autocast dtype it was cast to
        ctx.quant_range = quant_range
        ctx.conv_args = conv_args
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return torch.ops.aten.convolution(rounded, weight, bias, *conv_args)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        source, scale, zero_point, weight = ctx.saved_tensors
        rounded = Rounding(source, scale, zero_point, *ctx.quant_range).values().to(ctx.dtype)
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, rounded, weight, ctx.bias_sizes, *ctx.conv_args, [needs[0], needs[5], needs[6]]
        )
        return grad_input, None, None, None, None, grad_weight, grad_bias, None


def _rounding(layer: nn.Module, input: torch.Tensor) -> Rounding | None:
    quantizer = getattr(layer, "input_quantizer", None)
    if not isinstance(quantizer, FakeQuantizer) or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return quantizer.rounding_of(input)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast computes convolutions in on ``device`` now, ``None`` where it is off."""
    if torch.amp.autocast_mode.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast casts a convolution's arguments: floating tensors but float64 to ``dtype``."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def convolution(
    layer: Convolution,
    input: torch.Tensor,
    weight: torch.Tensor,
    output_size: list[int] | None = None,
) -> torch.Tensor | None:
    """What ``layer`` computes on the rounded ``input`` with ``weight``, keeping ``input``'s source for the backward
    pass; ``None`` where that does not apply (module docstring), so that the caller computes the plain convolution.

    Args:
        layer: a fake-quantized Conv1d/2d/3d or ConvTranspose1d/2d/3d (bias, stride, padding, dilation, groups
            and its ``input_quantizer``, shared or its own, are used).
        input: the rounded input ``(N, in_channels, *spatial)``, as the input quantizer returned it.
        weight: the weight to use, shaped as ``layer.weight``.
        output_size: for a transposed convolution, the spatial output size to pick (as ``ConvTranspose2d.forward``).
    """
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or input.dim() != weight.dim():
        return None
    rounding = _rounding(layer, input)
    if rounding is None:
        return None
    transposed = isinstance(layer, CONV_TRANSPOSE_TYPES)
    spatial = len(layer.kernel_size)
    output_padding = [0] * spatial
    if transposed:
        output_padding = transposed_padding.output_padding(layer, input.shape, output_size)
    conv_args: tuple[Any, ...] = (
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        transposed,
        list(output_padding),
        layer.groups,
    )
    grid = (rounding.qmin, rounding.qmax)
    device = input.device.type
    dtype = _autocast_dtype(device)  # cast as autocast would for the plain convolution, then compute as cast
    input, weight, bias = _cast(input, dtype), _cast(weight, dtype), _cast(layer.bias, dtype)
    with torch.autocast(device, enabled=False) if dtype is not None else contextlib.nullcontext():
        return _RecomputedInputConvolution.apply(
            input, rounding.source, rounding.scale, rounding.zero_point, grid, weight, bias, conv_args
        )
