"""Fused fake quantization in eager mode: the straight-through functions compiled once by inductor, on CPU.

``straight_through.fake_quantize_ste`` / ``fake_quantize_lsq`` take 4 vectorised passes forward and 4 to 7
backward. Compiled with ``torch.compile(dynamic=True)``, inductor turns each direction into one loop over the
tensor (the forward writes the grid values; the backward writes the input gradient and, for LSQ, reduces the scale
gradient in the same loop). The values and the input gradient are bit for bit those of the passes (the same float32
operations in the same order, round-half-to-even); the LSQ scale gradient is the same sum in another order.

Used in training (gradient mode on) for CPU tensors of at least ``MIN_FUSED_ELEMENTS`` values (activations; below
that, per-call overhead eats the gain), outside ``torch.compile``/``torch.export`` traces (where the caller's
compiler fuses them anyway). One kernel pair is generated per kind of call (STE or LSQ, per tensor or per channel,
rank, dtype, signed or unsigned grid), for any shape, the first time it is met: a few seconds, kept in inductor's
on-disk cache. Past ``torch._dynamo.config.recompile_limit`` kinds in one process, dynamo runs the passes itself
(with its warning). Without a working C++ compiler the first compilation fails and the passes are used from then on
(logged once). ``set_fused(False)`` turns the kernels off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qat_lightning.quant import straight_through

log = logging.getLogger(__name__)

MIN_FUSED_ELEMENTS = 65536
_compiled: dict[str, Callable[..., torch.Tensor]] = {}
_enabled = True


def set_fused(enabled: bool) -> None:
    """Use the compiled kernels (``True``, the default) or always the vectorised passes (``False``)."""
    global _enabled
    _enabled = enabled


def _kernel(name: str) -> Callable[..., torch.Tensor]:
    if name not in _compiled:
        _compiled[name] = torch.compile(getattr(straight_through, name), dynamic=True, fullgraph=True)
    return _compiled[name]


def _fused_call(name: str, x: torch.Tensor, *args: object) -> torch.Tensor:
    """``straight_through.<name>(x, *args)``, from the compiled kernel where it applies."""
    global _enabled
    plain = getattr(straight_through, name)
    if not (
        _enabled
        and type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.numel() >= MIN_FUSED_ELEMENTS
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        return plain(x, *args)
    try:
        return _kernel(name)(x, *args)
    except Exception as err:  # no C++ compiler, or inductor cannot build here: the passes give the same numbers
        _enabled = False
        log.warning("qat_lightning: fused fake quantization unavailable (%s); using vectorised passes.", err)
        return plain(x, *args)


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``straight_through.fake_quantize_ste`` (same arguments, same numbers), fused where it applies."""
    return _fused_call("fake_quantize_ste", x, scale, zero_point, qmin, qmax)


def fake_quantize_lsq(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_factor: float
) -> torch.Tensor:
    """``straight_through.fake_quantize_lsq`` (same arguments and numbers; the scale gradient summed in another
    order), fused where it applies."""
    return _fused_call("fake_quantize_lsq", x, scale, zero_point, qmin, qmax, grad_factor)
