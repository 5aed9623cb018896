"""Observers: modules that track the range of the tensors they see and turn it into scale/zero point.

Observers only record statistics; they never change the tensor. Their state lives in buffers (``min_val``,
``max_val``: shape ``()`` per tensor or ``(C,)`` per channel) so it is saved in checkpoints. Updates run on
the tensor's device with no host synchronisation. Any floating input dtype is accepted (bfloat16/float16
activations under autocast): the batch's range is taken in the input dtype and held in float32 (exact, as
every 16-bit value is a float32 value), so the statistics and the scales computed from them stay float32
whatever the training precision. A batch whose range is not finite (NaN/Inf) is skipped and
counted in ``skipped``. Under ``torch.distributed`` each batch's range is all-reduced first, so every process
holds the same statistics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from qat_lightning.quant.config import QuantizerConfig
from qat_lightning.quant.fused import candidate_errors
from qat_lightning.quant.primitives import choose_qparams, quant_range


def _global_range(cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max over every process of the default group (non-finite local values are ignored)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return cur_min, cur_max
    inf = torch.tensor(float("inf"), device=cur_min.device)
    packed = torch.stack(
        [torch.where(torch.isfinite(cur_min), -cur_min, -inf), torch.where(torch.isfinite(cur_max), cur_max, -inf)]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return -packed[0], packed[1]


def _aminmax(x: torch.Tensor, channel_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x``: scalars, or one per slice along ``channel_axis``."""
    if channel_axis is None:
        return torch.aminmax(x)
    flat = x.transpose(0, channel_axis).flatten(1)
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
    skipped: torch.Tensor

    def __init__(self, config: QuantizerConfig, num_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = (num_channels,) if config.per_channel else ()
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("skipped", torch.tensor(0))
        self._axis = config.channel_axis if config.per_channel else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the range of ``x`` (any floating dtype) in float32 and return ``x`` unchanged."""
        cur_min, cur_max = _aminmax(x, self._axis)
        cur_min, cur_max = _global_range(cur_min.float(), cur_max.float())
        finite = (cur_max - cur_min).abs_() < math.inf  # False when either bound is NaN or infinite
        if finite.dim():
            finite = finite.all()
        new_min, new_max = self._combine(cur_min, cur_max)
        torch.where(finite, torch.where(self.initialized, new_min, cur_min), self.min_val, out=self.min_val)
        torch.where(finite, torch.where(self.initialized, new_max, cur_max), self.max_val, out=self.max_val)
        self.initialized.logical_or_(finite)
        self.skipped.add_(finite.logical_not())
        return x

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def reset_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Forget what was observed and hold the range ``[min_val, max_val]`` (shape of ``min_val``) instead."""
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        self.initialized.fill_(True)

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


class MSEObserver(MinMaxObserver):
    """Running min/max, clipped to the range that minimises the mean squared quantization error.

    Keeps a bounded, reproducible sample of the observed values (4096 positions per batch drawn uniformly
    from a generator seeded with ``seed``, at most ``max_samples`` per channel, newest kept) and, when asked
    for parameters, tries ``num_candidates`` clipping ratios in [``min_ratio``, 1] of the running range, per
    channel. Meant for calibration (PTQ): the search costs a few passes over the sample. (A regular stride
    would alias with the layout: every 256th value of an ``(N, 16, 32, 32)`` activation is its left column.)
    """

    samples_per_batch = 4096

    def __init__(
        self,
        config: QuantizerConfig,
        num_channels: int = 1,
        max_samples: int = 65536,
        num_candidates: int = 50,
        min_ratio: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(config, num_channels)
        self.max_samples = max_samples
        self._generator = torch.Generator().manual_seed(seed)
        self.ratios = torch.linspace(min_ratio, 1.0, num_candidates).tolist()
        self._sample: torch.Tensor | None = None  # (channels, n) values; not part of the state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        super().forward(x)
        if self.config.per_channel:
            values = x.detach().transpose(0, self.config.channel_axis).flatten(1)
        else:
            values = x.detach().reshape(1, -1)
        if not bool(torch.isfinite(values).all()):  # calibration only: a host sync is fine here
            return x
        if values.shape[1] > self.samples_per_batch:
            positions = torch.randint(values.shape[1], (self.samples_per_batch,), generator=self._generator)
            values = values[:, positions.to(values.device)]
        values = values.float()
        merged = values.clone() if self._sample is None else torch.cat([self._sample, values], dim=1)
        if merged.shape[1] > self.max_samples:
            merged = merged[:, -self.max_samples :].clone()
        self._sample = merged  # a tensor of its own, never a view of ``x`` (``_search_errors``)
        return x

    def reset_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        super().reset_range(min_val, max_val)
        self._sample = None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sample is None:
            return super().qparams()
        bits, symmetric = self.config.bits, self.config.symmetric
        qmin, qmax = quant_range(bits, symmetric)
        sample = self._sample  # (C, n)
        ratios = torch.tensor(self.ratios, device=sample.device)
        scale, zp = choose_qparams(  # every candidate at once: (C, R)
            self.min_val.reshape(-1, 1) * ratios, self.max_val.reshape(-1, 1) * ratios, bits, symmetric
        )
        error = _search_errors(sample, scale, zp, qmin, qmax)
        best = torch.nan_to_num(error, nan=math.inf).argmin(dim=1, keepdim=True)  # the first of equal minima
        best_scale, best_zp = scale.gather(1, best).squeeze(1), zp.gather(1, best).squeeze(1)
        shape = self.min_val.shape
        return best_scale.reshape(shape), best_zp.reshape(shape)


def _search_errors(
    sample: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``fused.candidate_errors`` of the ``(C, n)`` sample on the ``(C, R)`` candidates, a few candidates at a time
    (at most ~16 M values in flight unfused, or two candidates' worth for a sample of more than 8 M values), as
    ``(C, R)`` errors.

    Every chunk holds at least two candidates (``R >= 2``) and its scales are a tensor of their own, not a view: the
    compiled kernel then meets one kind of call per granularity (per tensor or per channel) instead of a new one
    for each chunk width of 1 or each view's layout, which on a torchvision ResNet-18 passed dynamo's
    recompile limit during the first calibration. (The zero points become new tensors in ``code_bounds``.)
    """
    candidates = scale.shape[1]
    chunks = max(1, min(candidates // 2, math.ceil(candidates * sample.numel() / 2**24)))
    errors = [
        candidate_errors(sample, s.clone(), z, qmin, qmax)
        for s, z in zip(scale.tensor_split(chunks, dim=1), zero_point.tensor_split(chunks, dim=1), strict=True)
    ]
    return torch.cat(errors, dim=1)


def build_observer(config: QuantizerConfig, num_channels: int = 1) -> Observer:
    """The observer named by ``config.observer``."""
    classes = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver, "mse": MSEObserver}
    return classes[config.observer](config, num_channels)
