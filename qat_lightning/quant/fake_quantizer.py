"""``FakeQuantizer``: a thin module built from a ``QuantizerConfig`` (observer + differentiable fake quantization)."""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import torch
from torch import nn

from qat_lightning.quant import rounding
from qat_lightning.quant.config import QuantizerConfig
from qat_lightning.quant.fused import fake_quantize_lsq
from qat_lightning.quant.observers import build_observer
from qat_lightning.quant.primitives import EPS, broadcast_along, choose_qparams, quant_range, quantize
from qat_lightning.quant.rounding import Rounding
from qat_lightning.quant.straight_through import fake_quantize_ste


class FakeQuantizer(nn.Module):
    """Rounds a tensor to the grid of ``config`` in floating point, with a straight-through gradient.

    In training mode with ``observer_enabled``, each call first updates the observer and refreshes
    ``scale``/``zero_point``; otherwise the stored parameters are used as they are (frozen observers cost
    nothing). Before the first observation the quantizer passes tensors through unchanged.

    ``producer`` names the module (relative to the model root) at whose output the quantizer is applied when the
    input it rounds is shared with other consumers (see ``qat_lightning.nn.input_sharing``); ``None``: at the
    input of its own layer.

    With ``config.learned_scale`` (LSQ), ``scale`` is an ``nn.Parameter`` set from the observer on the first
    training batch and then learned: its gradient is the LSQ gradient scaled by
    ``1 / sqrt(elements_per_scale * qmax)`` (Esser et al., 2020), the gradient of PyTorch's learnable
    fake-quant kernels (computed by ``straight_through.fake_quantize_lsq``). The zero point stays as observed.

    Args:
        config: bits, scheme, granularity, observer and whether the scale is learned.
        num_channels: channels along ``config.channel_axis`` for a per-channel quantizer.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, config: QuantizerConfig, num_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        self.observer = build_observer(config, num_channels)
        shape = (num_channels,) if config.per_channel else ()
        if config.learned_scale:
            self.scale = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self._calibrated = False
        self.producer: str | None = None
        self._quant_range = quant_range(config.bits, config.symmetric)
        self._latest: tuple[Any, ...] | None = None  # see ``_remember``

    @property
    def axis(self) -> int | None:
        """Channel axis of the quantized tensor, or ``None`` per tensor."""
        return self.config.channel_axis if self.config.per_channel else None

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer has observed data (or loaded observed state from a checkpoint)."""
        return self._calibrated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any shape, any floating dtype); returns a tensor of its shape and dtype.

        The observer, the scale, the zero point and the rounding are float32 whatever the dtype of ``x``:
        under autocast (``bf16-mixed``, ``16-mixed``) autocast is switched off here, a 16-bit ``x`` is
        observed and rounded as the float32 values it holds, and the grid values are returned in the dtype of
        ``x`` (the nearest 16-bit values; the layer that follows computes in 16 bits anyway). Codes of up to
        8 bits survive that rounding: ``round(out / scale) + zero_point`` gives them back.
        """
        device_type = x.device.type
        if torch.amp.autocast_mode.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._fake_quantize(x)
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observer_enabled and not (self.config.learned_scale and self._calibrated):
            with torch.no_grad():
                self.observer(x)
                scale, zero_point = self.observer.qparams()
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
            self._calibrated = True
        if not (self.fake_quant_enabled and self._calibrated):
            return x
        qmin, qmax = self._quant_range
        zero_point = broadcast_along(self.zero_point, x, self.axis)
        if not self.config.learned_scale:
            scale = broadcast_along(self.scale, x, self.axis)
            out = fake_quantize_ste(x, scale, zero_point, qmin, qmax)
        else:
            scale = broadcast_along(self.scale.clamp(min=EPS), x, self.axis)
            grad_factor = 1.0 / math.sqrt(x.numel() // self.scale.numel() * qmax)
            out = fake_quantize_lsq(x, scale, zero_point, qmin, qmax, grad_factor)
        self._remember(x, out, scale, zero_point)
        return out

    def _remember(self, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Record how ``out`` was made, for ``rounding_of``: in eager differentiable calls on large tensors only
        (where a layer saves it otherwise). ``x`` and ``out`` are held weakly; the grid is copied."""
        if torch.compiler.is_compiling():
            return
        latest = None
        if out.requires_grad and x.numel() >= rounding.MIN_RECOMPUTED_ELEMENTS and rounding.recompute_enabled():
            grid = (scale.detach().float().clone(), zero_point.float(), *self._quant_range)
            latest = (weakref.ref(out), weakref.ref(x), grid)
        self.__dict__["_latest"] = latest

    def rounding_of(self, y: torch.Tensor) -> Rounding | None:
        """How ``y`` was rounded, if it is this quantizer's latest output and was recorded (a differentiable eager
        call on at least ``rounding.MIN_RECOMPUTED_ELEMENTS`` values, with ``rounding.set_recompute`` on, whose
        input is still alive); else ``None``.

        A layer that reads ``y`` can save ``Rounding.source`` for its backward pass and recompute ``y`` from it,
        instead of keeping ``y`` (see ``qat_lightning.nn.recomputed_input``).
        """
        latest = self.__dict__.get("_latest")
        if latest is None or latest[0]() is not y:
            return None
        source = latest[1]()
        return None if source is None else Rounding(source, *latest[2])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_latest"] = None  # weak references do not pickle or copy
        return state

    def clipping_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real range ``(low, high)`` the grid covers now: ``[(qmin - zp) * s, (qmax - zp) * s]`` (shape of
        ``scale``; ``+-s * (qmax - qmin) / 2`` when symmetric)."""
        qmin, qmax = self._quant_range
        scale = self.scale.detach().clamp(min=EPS)
        if self.config.symmetric:
            high = scale * (qmax - qmin) / 2
            return -high, high
        return (qmin - self.zero_point) * scale, (qmax - self.zero_point) * scale

    @torch.no_grad()
    def start_from(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Start from a grid found elsewhere (a calibration): set ``scale`` and ``zero_point`` (shape of ``scale``)
        in place and seed the observer with the range they cover, so an observer that keeps updating moves on
        from that range and a checkpoint records the quantizer as calibrated."""
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.observer.reset_range(*self.clipping_range())
        self._calibrated = True

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Move to a ``bits``-bit grid over the clipping range used now, in place (everything derived follows).

        The config (and the observer's), the integer range and, once calibrated, the scale and zero point are
        updated together: the range ``[(qmin - zp) * s, (qmax - zp) * s]`` (``+-s * (qmax - qmin) / 2`` when
        symmetric) is kept and divided into ``2**bits`` levels.
        """
        old = self.config
        if bits == old.bits:
            return
        low, high = self.clipping_range()
        self.config = self.observer.config = dataclasses.replace(old, bits=bits)
        self._quant_range = quant_range(bits, old.symmetric)
        if self._calibrated:
            new_scale, new_zero_point = choose_qparams(low, high, bits, old.symmetric)
            self.scale.copy_(new_scale)
            self.zero_point.copy_(new_zero_point)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32, shape of ``x``) with the current scale and zero point."""
        scale = self.scale.detach().clamp(min=EPS)
        return quantize(x, scale, self.zero_point, self.config.bits, self.config.symmetric, self.axis)

    def get_extra_state(self) -> dict[str, Any]:
        """Config and switches, saved with the buffers so a checkpoint describes its own quantizers."""
        return {
            "config": dataclasses.asdict(self.config),
            "observer_enabled": self.observer_enabled,
            "fake_quant_enabled": self.fake_quant_enabled,
            "producer": self.producer,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if QuantizerConfig(**state["config"]) != self.config:
            raise ValueError(
                f"The checkpoint's quantizer config {state['config']} differs from this quantizer's "
                f"{dataclasses.asdict(self.config)}; rebuild the model with `prepare_for_state_dict`."
            )
        if state.get("producer") != self.producer:
            raise ValueError(
                f"The checkpoint's quantizer is applied at the output of {state.get('producer')!r}, this one at "
                f"{self.producer!r}; rebuild the model with `prepare_for_state_dict`."
            )
        self.observer_enabled = state["observer_enabled"]
        self.fake_quant_enabled = state["fake_quant_enabled"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        initialized = state_dict.get(prefix + "observer.initialized")
        if initialized is not None:
            self._calibrated = bool(initialized)

    def extra_repr(self) -> str:
        c = self.config
        scheme = "symmetric" if c.symmetric else "asymmetric"
        granularity = "per_channel" if c.per_channel else "per_tensor"
        scale = "learned (LSQ)" if c.learned_scale else "observed"
        return f"bits={c.bits}, {scheme}, {granularity}, observer={c.observer}, scale={scale}"
