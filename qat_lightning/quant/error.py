"""Quantization error of a tensor: signal-to-quantization-noise ratio and maximum absolute error."""

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
