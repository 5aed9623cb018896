"""Differentiable fake quantization: straight-through (STE) and learned-step-size (LSQ) gradients.

Both functions compute exactly what PyTorch's fused fake-quant kernels compute,
``(clamp(round(x * (1 / scale)) + zero_point, qmin, qmax) - zero_point) * scale`` in float32 with
round-half-to-even, and give the same gradients, but from a handful of vectorised in-place float32 passes
(no boolean tensors, no integer tensors). On x86 CPUs this is several times faster than the fused kernels,
whose CPU paths are scalar loops; on other devices it is at least as fast.

The backward passes recompute the in-range mask from the saved input instead of caching it, so a quantizer
keeps no activation-sized tensor alive beyond the input (which the preceding layer usually saves anyway)
and, for LSQ, its output (which the following layer saves). They use the forward pass's ``1 / scale`` and
zero point (saved copies), so quantizers whose buffers are updated in place between a forward and its
backward (a layer called twice per step) stay correct.

``scale`` and ``zero_point`` must already broadcast against ``x`` (shape ``()`` per tensor, or ``(C,)``
reshaped onto the channel axis, see ``primitives.broadcast_along``); ``zero_point`` holds integral values
in any float dtype.
"""

from __future__ import annotations

import numpy as np
import torch


def _cpu_zero_point(zero_point: torch.Tensor) -> float | None:
    """The zero point as a number when it is one value on the CPU, else ``None``.

    Reading a CPU tensor waits for no device. Not done while ``torch.compile``/``torch.export`` trace, where the
    read would break the graph.
    """
    if zero_point.numel() == 1 and zero_point.device.type == "cpu" and not torch.compiler.is_compiling():
        return zero_point.item()
    return None


def _input_interval(inv_scale: float, lo: float, hi: float) -> tuple[float, float] | None:
    """The float32 inputs ``x`` whose code ``round_half_even(float32(x * inv_scale))`` lies in ``[lo, hi]``.

    The code is non-decreasing in ``x``, so these inputs form an interval ``[x_lo, x_hi]``; both ends are found
    exactly, from the estimate ``(bound -+ 0.5) / inv_scale`` (within a few float32 steps), by stepping one
    float32 at a time. ``None`` for a scale so extreme (beyond 1e+-30) that the estimate could overflow.
    """
    if not 1e-30 < inv_scale < 1e30:
        return None
    inv = np.float32(inv_scale)

    def code(x: np.float32) -> np.float32:
        return np.rint(x * inv)

    x_lo = np.float32((lo - 0.5) / inv_scale)
    while code(x_lo) < lo:
        x_lo = np.nextafter(x_lo, np.float32(np.inf))
    while code(np.nextafter(x_lo, np.float32(-np.inf))) >= lo:
        x_lo = np.nextafter(x_lo, np.float32(-np.inf))
    x_hi = np.float32((hi + 0.5) / inv_scale)
    while code(x_hi) > hi:
        x_hi = np.nextafter(x_hi, np.float32(-np.inf))
    while code(np.nextafter(x_hi, np.float32(np.inf))) <= hi:
        x_hi = np.nextafter(x_hi, np.float32(np.inf))
    return float(x_lo), float(x_hi)


def _fake_quantize_values(
    x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    codes = (x.float() * inv_scale).round_()
    z = _cpu_zero_point(zero_point)
    if z is not None:  # shift the grid by the zero point instead of the codes: exact, and two passes fewer
        return codes.clamp_(qmin - z, qmax - z).mul_(scale)
    return codes.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def _in_range_mask(
    x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """1.0 where the rounded code of ``x`` lies on the grid ``[qmin, qmax]``, 0.0 where it is clamped (float32).

    Built in one new buffer, which callers reuse. With a CPU zero point the test runs on ``x`` itself against
    the exact interval of inputs that land on the grid (two passes); otherwise on the codes, where ``c`` is on
    the grid exactly when ``|c - (qmin + qmax) / 2| <= (qmax - qmin) / 2`` (integers and half-integers, exact
    in float32). Comparisons write float32 (``out=``): boolean tensors take slow scalar paths on CPU.
    """
    z = _cpu_zero_point(zero_point)
    interval = None if z is None else _input_interval(inv_scale.item(), qmin - z, qmax - z)
    if interval is not None:
        clamped = x.float().clamp(*interval)
        return torch.eq(x, clamped, out=clamped)
    codes = (x.float() * inv_scale).round_().add_(zero_point)
    codes.sub_((qmin + qmax) / 2).abs_()
    return torch.le(codes, (qmax - qmin) / 2, out=codes)


class _StraightThroughFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
        inv_scale = torch.reciprocal(scale)
        ctx.save_for_backward(x, inv_scale, zero_point)
        ctx.quant_range = (qmin, qmax)
        return _fake_quantize_values(x, scale, inv_scale, zero_point, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, inv_scale, zero_point = ctx.saved_tensors
        grad_x = _in_range_mask(x, inv_scale, zero_point, *ctx.quant_range).mul_(grad_out)
        return grad_x.to(x.dtype), None, None, None, None


class _LearnedScaleFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):  # type: ignore[no-untyped-def]
        inv_scale = torch.reciprocal(scale)
        ctx.save_for_backward(x, scale, inv_scale, zero_point)
        ctx.quant_range = (qmin, qmax)
        ctx.grad_factor = grad_factor
        return _fake_quantize_values(x, scale, inv_scale, zero_point, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, scale, inv_scale, zero_point = ctx.saved_tensors
        inside = _in_range_mask(x, inv_scale, zero_point, *ctx.quant_range)
        out = _fake_quantize_values(x, scale, inv_scale, zero_point, *ctx.quant_range)  # recomputed, not kept
        grad_out = grad_out.float()
        grad_x = grad_out * inside
        # d out / d scale is (out - x) / scale inside the range and out / scale (the clamp bound) outside;
        # ``inside * x - out`` is its negative, times scale, built in place in the mask's buffer.
        minus_per_element = inside.mul_(x).sub_(out)
        if inv_scale.numel() == 1:
            grad_scale = torch.dot(grad_out.reshape(-1), minus_per_element.reshape(-1)).reshape(inv_scale.shape)
        else:
            dims = [d for d in range(x.dim()) if inv_scale.shape[d] == 1]
            grad_scale = (grad_out * minus_per_element).sum(dim=dims, keepdim=True)
        grad_scale.mul_(inv_scale).mul_(-ctx.grad_factor)
        return grad_x.to(x.dtype), grad_scale, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Fake-quantize ``x`` with a straight-through gradient: 1 where ``x`` is on the grid's range, 0 outside.

    ``scale`` (float32, > 0) and ``zero_point`` (integral values) broadcast against ``x``; no gradient flows to
    either. Returns a tensor of the shape and dtype of ``x``.
    """
    return _StraightThroughFakeQuantize.apply(x, scale.float(), _fresh_float(zero_point), qmin, qmax)


def fake_quantize_lsq(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_factor: float
) -> torch.Tensor:
    """Fake-quantize ``x`` with a learned step size (LSQ, Esser et al. 2020).

    ``x`` gets the straight-through gradient; ``scale`` gets
    ``grad_factor * sum(grad_out * d out / d scale)`` over the elements it scales, where
    ``d out / d scale = round(x / s) - x / s`` inside the range and ``qmin - zero_point`` or
    ``qmax - zero_point`` below or above it (PyTorch's ``_fake_quantize_learnable_*`` gradient).
    ``zero_point`` gets no gradient. Returns a tensor of the shape and dtype of ``x``.
    """
    return _LearnedScaleFakeQuantize.apply(x, scale.float(), _fresh_float(zero_point), qmin, qmax, grad_factor)


def fake_quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The values ``fake_quantize_ste`` and ``fake_quantize_lsq`` return (bit for bit), without a gradient: for
    recomputing a rounded tensor from its source instead of keeping it. Same arguments; shape and dtype of ``x``."""
    with torch.no_grad():
        return _fake_quantize_values(x, scale, torch.reciprocal(scale), zero_point, qmin, qmax).to(x.dtype)


def _fresh_float(zero_point: torch.Tensor) -> torch.Tensor:
    """A float32 copy: the backward pass must see the zero point of the forward pass even if the caller's
    tensor (an observer-updated buffer) changes in place before then."""
    return zero_point.to(torch.float32, copy=True)
