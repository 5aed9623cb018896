"""Quantization error of a tensor: signal-to-quantization-noise ratio, maximum absolute error, and the mean
squared error of candidate grids (the clipping search of ``MSEObserver``)."""

from __future__ import annotations

import torch


def _check_shapes(reference: torch.Tensor, approximation: torch.Tensor) -> None:
    if reference.shape != approximation.shape:
        raise ValueError(
            f"`reference` and `approximation` must have the same shape, got {tuple(reference.shape)} "
            f"and {tuple(approximation.shape)}."
        )


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """Signal-to-quantization-noise ratio ``10 * log10(sum(r**2) / sum((r - a)**2))`` in decibels.

    Computed in float64 over all elements. ``+inf`` when the approximation is exact (even of zeros); ``-inf``
    for an all-zero reference approximated with an error. Each extra bit of a uniform grid adds about 6.02 dB.

    Args:
        reference: the original tensor (e.g. float weights).
        approximation: the tensor after quantization (e.g. fake-quantized weights), same shape.

    Returns:
        A float64 scalar tensor.
    """
    _check_shapes(reference, approximation)
    r = reference.detach().double()
    signal = r.square().sum()
    noise = (r - approximation.detach().double()).square().sum()
    ratio_db = 10 * (torch.log10(signal) - torch.log10(noise))
    return torch.where(noise == 0, torch.full_like(ratio_db, float("inf")), ratio_db)


def max_abs_error(reference: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """Largest elementwise ``|reference - approximation|``, in the units of the tensors (float64 scalar)."""
    _check_shapes(reference, approximation)
    return (reference.detach().double() - approximation.detach().double()).abs().amax()


def candidate_errors(
    sample: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Mean squared error of rounding each row of ``sample`` to each of its candidate grids.

    Args:
        sample: ``(C, n)`` float32 values, one row per channel (one row per tensor).
        scale, zero_point: ``(C, R)``, the ``R`` candidate grids of each row (float32 scale, integral zero point).
        qmin, qmax: the integer range of the grids.

    Returns:
        ``(C, R)`` float32: ``mean((fake_quantize(sample[c]) - sample[c]) ** 2)`` on grid ``(c, r)``, in the
        squared units of ``sample``.
    """
    low, high = code_bounds(zero_point, qmin, qmax)
    return grid_errors(sample, scale, low, high)


def code_bounds(zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qmin - zero_point, qmax - zero_point)`` in float32: the range of ``round(x / scale)`` that lands on the
    grid, the grid shifted by the zero point (shape of ``zero_point``)."""
    zero_point = zero_point.float()
    return qmin - zero_point, qmax - zero_point


def grid_errors(sample: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``candidate_errors`` with the grids given as scales and code bounds (``code_bounds``), tensors only, so a
    compiled kernel of it serves every bit width and zero point.

    ``clamp(round(x * (1 / s)), qmin - z, qmax - z) * s`` is torch's fake-quantized value bit for bit (the codes are
    integers, exact in float32); shapes as in ``candidate_errors``, ``low``/``high`` like ``scale``.
    """
    values = sample[:, None, :]
    inv_scale = torch.reciprocal(scale)[..., None]
    rounded = (values * inv_scale).round_().clamp_(low[..., None], high[..., None]).mul_(scale[..., None])
    return (rounded - values).pow_(2).mean(dim=2)
