"""Pure functions for uniform affine quantization.

Conventions (shared by every function here):

- ``bits`` is the width of the integer grid, 2..16.
- Symmetric quantization uses the signed grid ``[-2**(bits-1), 2**(bits-1) - 1]`` with zero point 0 and
  ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``.
- Asymmetric quantization uses the unsigned grid ``[0, 2**bits - 1]``; the range is widened to contain 0 so
  that 0.0 is exactly representable, and the zero point is clamped into the grid.
- ``scale`` and ``zero_point`` are tensors of shape ``()`` (per tensor) or ``(C,)`` (per channel, along
  ``axis`` of the quantized tensor). ``scale`` is float32 and at least ``EPS``; ``zero_point`` is int32.
- Rounding is round-half-to-even, as in PyTorch's quantization kernels.
"""

from __future__ import annotations

import torch

from qat_lightning.quant.straight_through import fake_quantize_ste

MIN_BITS = 2
MAX_BITS = 16
EPS = torch.finfo(torch.float32).eps


def check_bits(bits: object, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 2..16, else raise a ``ValueError`` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}.")
    return bits


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for ``bits`` bits: signed when ``symmetric``, else unsigned."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the real range ``[min_val, max_val]`` onto the ``bits``-bit grid.

    Args:
        min_val, max_val: observed range, shape ``()`` or ``(C,)``, same units as the data.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the same shape as ``min_val``.
    """
    qmin, qmax = quant_range(bits, symmetric)
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        max_abs = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(max_abs / ((qmax - qmin) / 2), min=EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / (qmax - qmin), min=EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def broadcast_along(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel parameter of shape ``(C,)`` so it broadcasts along ``axis`` of ``x``."""
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    symmetric: bool,
    axis: int | None = None,
) -> torch.Tensor:
    """Map real values to integers on the grid: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    ``x / scale`` is computed as ``x * (1 / scale)`` in float32, as PyTorch's quantization kernels do, so the
    codes agree with theirs (and with ``fake_quantize``) even at rounding ties.
    Returns an int32 tensor of the shape of ``x``. ``axis`` is the channel axis for per-channel parameters.
    """
    qmin, qmax = quant_range(bits, symmetric)
    s = broadcast_along(scale, x, axis)
    z = broadcast_along(zero_point, x, axis)
    return torch.clamp(torch.round(x.float() * torch.reciprocal(s.float())) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Map integers back to real values: ``(q - zero_point) * scale`` (float32, shape of ``q``)."""
    s = broadcast_along(scale, q, axis)
    z = broadcast_along(zero_point, q, axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    symmetric: bool,
    axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in floating point, with a straight-through gradient.

    The gradient w.r.t. ``x`` is 1 where ``x`` falls inside the clamp range and 0 outside. Bit-identical to
    PyTorch's fused ``fake_quantize_per_{tensor,channel}_affine`` (see ``straight_through``).
    """
    qmin, qmax = quant_range(bits, symmetric)
    s = broadcast_along(scale, x, axis)
    z = broadcast_along(zero_point, x, axis)
    return fake_quantize_ste(x, s, z, qmin, qmax)
