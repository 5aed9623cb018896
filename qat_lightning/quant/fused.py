"""Fused fake quantization in eager mode: ``straight_through.fake_quantize_lsq`` compiled once by inductor,
``straight_through.fake_quantize_values`` (the values without a gradient, for recomputing a rounded input in a
backward pass, ``qat_lightning.nn.recomputed_input``) likewise: one loop instead of four passes; and
``error.candidate_errors`` (the clipping search of ``MSEObserver``, compiled as ``error.grid_errors``), one loop
that rounds, squares and sums without writing the ``(C, R, n)`` rounded candidates (measured, 1 thread, 50
candidates of a 40,960-value sample: 1.1 ms against 10.3 ms for the passes; the errors agree within float32
summation order, about 1e-6 relative).

``fake_quantize_lsq`` takes 4 vectorised passes forward and 7 backward. Compiled with
``torch.compile(dynamic=True)``, inductor turns each direction into one loop over the tensor (the forward writes
the grid values; the backward writes the input gradient and reduces the scale gradient in the same loop). The
values and the input gradient are bit for bit those of the passes (the same float32 operations in the same order,
round-half-to-even); the scale gradient is the same sum in another order.

The straight-through function is not compiled: there AOT autograd's partitioner moves the in-range test into the
forward kernel and saves it as a ``bool`` tensor, and inductor's ``bool`` stores are slow here (measured on 1M
values, 1 thread: that forward 29 ms, against 0.8 ms without gradient and 1.3 ms for the passes).

Used (``fake_quantize_lsq`` in gradient mode only) for CPU tensors of at least ``MIN_FUSED_ELEMENTS`` values
(activations; below that, per-call overhead eats the gain), outside ``torch.compile``/``torch.export`` traces
(where the caller's compiler fuses them anyway). One kernel (pair) is generated per function and kind of call (per
tensor or per channel, rank, dtype, signed or unsigned grid), for any shape, the first time it is met: a few
seconds, kept in inductor's on-disk cache. A kernel that fails (no working C++ compiler; or more kinds than
``torch._dynamo.config.recompile_limit``, an error under ``fullgraph=True``) is replaced by the passes from then on,
logged once; the other kernels keep theirs. ``set_fused(False)`` turns the kernels off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qat_lightning.quant import error, straight_through

log = logging.getLogger(__name__)

MIN_FUSED_ELEMENTS = 65536
_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "lsq": straight_through.fake_quantize_lsq,
    "values": straight_through.fake_quantize_values,
    "errors": error.grid_errors,
}
_compiled: dict[str, Callable[..., torch.Tensor]] = {}
_failed: set[str] = set()  # kernels whose compilation or call failed once: the passes from then on
_enabled = True


def set_fused(enabled: bool) -> None:
    """Use the compiled kernels (``True``, the default) or always the vectorised passes (``False``)."""
    global _enabled
    _enabled = enabled


def _kernel(name: str) -> Callable[..., torch.Tensor]:
    if name not in _compiled:
        _compiled[name] = torch.compile(_FUNCTIONS[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _run(
    name: str, x: torch.Tensor, args: tuple[object, ...], training: bool, elements: int | None = None
) -> torch.Tensor:
    """``_FUNCTIONS[name](*args)`` from its compiled kernel where that applies (``x`` a CPU tensor, ``elements``
    values of work, default ``x.numel()``, at least ``MIN_FUSED_ELEMENTS``; eager; in gradient mode when
    ``training``; the kernel has not failed before), else as it is."""
    if not (
        _enabled
        and name not in _failed
        and type(x) is torch.Tensor
        and x.device.type == "cpu"
        and (x.numel() if elements is None else elements) >= MIN_FUSED_ELEMENTS
        and (torch.is_grad_enabled() or not training)
        and not torch.compiler.is_compiling()
    ):
        return _FUNCTIONS[name](*args)
    try:
        # Our own kernels are an eager-mode detail: compiled even where the caller forces compiled code to run
        # eagerly (calibration runs the model under ``set_stance("force_eager")``).
        with torch.compiler.set_stance("default"):
            return _kernel(name)(*args)
    except Exception as err:  # no C++ compiler, inductor cannot build here, or past dynamo's recompile limit:
        _failed.add(name)  # the passes give the same numbers; the other kernels are tried on their own
        log.warning(
            "qat_lightning: fused fake quantization unavailable for %s (%s); using vectorised passes.", name, err
        )
        return _FUNCTIONS[name](*args)


def fake_quantize_lsq(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_factor: float
) -> torch.Tensor:
    """``straight_through.fake_quantize_lsq`` (same arguments and numbers; the scale gradient summed in another
    order), from the compiled kernel where it applies (in gradient mode)."""
    return _run("lsq", x, (x, scale, zero_point, qmin, qmax, grad_factor), training=True)


def fake_quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``straight_through.fake_quantize_values`` (same arguments, the same values bit for bit), from the compiled
    kernel where it applies: one pass instead of four, for recomputing a rounded tensor in a backward pass."""
    return _run("values", x, (x, scale, zero_point, qmin, qmax), training=False)


def candidate_errors(
    sample: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``error.candidate_errors`` (same arguments, the same errors up to float32 summation order), from the
    compiled kernel where it applies (``sample.numel()`` times the candidates per row, at least
    ``MIN_FUSED_ELEMENTS``). The kernel takes the grids as tensors (``error.grid_errors``): one kernel for every
    bit width and zero point, where integer arguments would compile one per value."""
    low, high = error.code_bounds(zero_point, qmin, qmax)
    elements = sample.numel() * scale.shape[-1]
    return _run("errors", sample, (sample, scale, low, high), training=False, elements=elements)
