"""Observers: modules that track the range of the tensors they see and turn it into scale/zero point.

Observers only record statistics; they never change the tensor. Their state lives in buffers (``min_val``,
``max_val``: shape ``()`` per tensor or ``(C,)`` per channel) so it is saved in checkpoints. Updates run on
the tensor's device with no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.quant.config import QuantizerConfig
from qat_lightning.quant.primitives import choose_qparams


def _aminmax(x: torch.Tensor, channel_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x``: scalars, or one per slice along ``channel_axis``."""
    if channel_axis is None:
        return torch.aminmax(x.detach())
    flat = x.detach().transpose(0, channel_axis).flatten(1)
    return torch.aminmax(flat, dim=1)


class Observer(nn.Module):
    """Base class: keeps ``min_val``/``max_val`` and computes quantization parameters from them.

    Args:
        config: the quantizer configuration (bits, scheme, granularity).
        num_channels: number of channels for a per-channel observer (ignored per tensor).
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, config: QuantizerConfig, num_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = (num_channels,) if config.per_channel else ()
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the range of ``x`` and return ``x`` unchanged."""
        axis = self.config.channel_axis if self.config.per_channel else None
        cur_min, cur_max = _aminmax(x, axis)
        new_min, new_max = self._combine(cur_min, cur_max)
        self.min_val.copy_(torch.where(self.initialized, new_min, cur_min))
        self.max_val.copy_(torch.where(self.initialized, new_max, cur_max))
        self.initialized.fill_(True)
        return x

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range observed so far (see ``primitives.choose_qparams``)."""
        return choose_qparams(self.min_val, self.max_val, self.config.bits, self.config.symmetric)


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything observed."""

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.min_val, cur_min), torch.maximum(self.max_val, cur_max)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min/max: ``old + c * (new - old)``, ``c`` in (0, 1]."""

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config.averaging_constant
        return torch.lerp(self.min_val, cur_min, c), torch.lerp(self.max_val, cur_max, c)


def build_observer(config: QuantizerConfig, num_channels: int = 1) -> Observer:
    """The observer named by ``config.observer``."""
    cls = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}[config.observer]
    return cls(config, num_channels)
