"""Configuration of one fake quantizer, as a plain dataclass (validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qat_lightning.quant.primitives import check_bits

ObserverName = Literal["minmax", "moving_average", "mse"]
OBSERVERS: tuple[str, ...] = ("minmax", "moving_average", "mse")


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor (a layer's weight or its input activation) is fake-quantized.

    Args:
        bits: integer grid width, 2..16.
        symmetric: signed grid with zero point 0 (weights) or unsigned grid with a zero point (activations).
        per_channel: one scale per slice along ``channel_axis`` instead of one per tensor.
        channel_axis: the axis holding output channels (0 for Conv/Linear weights).
        observer: ``"minmax"`` (running extremes of everything seen), ``"moving_average"`` (exponential
            moving average of each batch's min/max with ``averaging_constant``) or ``"mse"`` (the clipping
            range that minimises the quantization error of a sample of the data; for calibration).
        averaging_constant: weight of the newest batch in the moving average, in (0, 1]; 1 tracks the
            current tensor exactly, which is what weights need.
        learned_scale: learn the scale by gradient descent (LSQ, Esser et al. 2020), initialised from the
            observer on the first training batch; the observer is not used after that.
    """

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    channel_axis: int = 0
    observer: ObserverName = "moving_average"
    averaging_constant: float = 0.01
    learned_scale: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.observer not in OBSERVERS:
            raise ValueError(f"`observer` must be one of {OBSERVERS}, got {self.observer!r}.")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"`averaging_constant` must be in (0, 1], got {self.averaging_constant!r}.")


def weight_config(
    bits: int, learned_scale: bool = False, per_channel: bool = True, observer: ObserverName = "moving_average"
) -> QuantizerConfig:
    """Default weight quantizer: per-channel symmetric over output channels, range of the current weights."""
    return QuantizerConfig(
        bits=bits,
        symmetric=True,
        per_channel=per_channel,
        observer=observer,
        averaging_constant=1.0,
        learned_scale=learned_scale,
    )


def activation_config(
    bits: int, learned_scale: bool = False, observer: ObserverName = "moving_average"
) -> QuantizerConfig:
    """Default activation quantizer: per-tensor asymmetric, moving-average range (torch.ao's QAT default)."""
    return QuantizerConfig(
        bits=bits,
        symmetric=False,
        per_channel=False,
        observer=observer,
        averaging_constant=0.01,
        learned_scale=learned_scale,
    )
