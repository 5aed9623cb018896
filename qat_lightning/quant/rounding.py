"""What a rounded tensor was rounded from: enough to recompute it instead of keeping it for the backward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qat_lightning.quant.fused import fake_quantize_values

# Tensors smaller than this are kept as they are: recomputing them would cost more per call than their memory is worth.
MIN_RECOMPUTED_ELEMENTS = 65536
_enabled = True


def set_recompute(enabled: bool) -> None:
    """Let layers recompute their rounded inputs in the backward pass (``True``, the default: QAT keeps about the
    memory of float training) or keep them (``False``: one activation more per quantized input, one elementwise pass
    less per layer; see ``qat_lightning.nn.recomputed_input``)."""
    global _enabled
    _enabled = enabled


def recompute_enabled() -> bool:
    """Whether ``set_recompute`` left recomputing on."""
    return _enabled


@dataclass(frozen=True)
class Rounding:
    """``source`` fake-quantized onto the integer grid ``[qmin, qmax]`` with ``scale`` and ``zero_point``.

    ``scale`` (float32, > 0) and ``zero_point`` (integral values, float32) are copies taken when the rounding ran,
    shaped to broadcast against ``source`` (``()`` per tensor); a later observer update does not change them.
    """

    source: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    def values(self) -> torch.Tensor:
        """The rounded tensor, recomputed bit for bit (shape and dtype of ``source``, no gradient; one fused pass on
        large CPU tensors, see ``fused``)."""
        return fake_quantize_values(self.source, self.scale, self.zero_point, self.qmin, self.qmax)
