"""Calibration: run a few batches through a fake-quantized model to set its scales (PTQ, and the start of QAT)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat_lightning.nn import FakeQuantizedModule, quantizers, set_observers_enabled
from qat_lightning.nn.normalization import BATCH_NORM_TYPES
from qat_lightning.quant import FakeQuantizer, build_observer


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any, int], Any], num_batches: int) -> int:
    """Observe ``num_batches`` batches with every quantizer of ``model`` recording, then freeze the scales.

    The rest of the model stays in eval mode (BatchNorm uses and keeps its running statistics); no gradient is
    computed and no parameter changes. ``forward(batch, batch_idx)`` runs the model on one batch.

    Returns:
        The number of batches observed (fewer than ``num_batches`` if ``batches`` ran out).
    """
    was_training = model.training
    model.eval()
    set_observers_enabled(model, True)
    for quantizer in quantizers(model):
        quantizer.train()
    seen = _run_batches(batches, forward, num_batches)
    set_observers_enabled(model, False)
    model.train(was_training)
    return seen


@torch.no_grad()
def reestimate_batch_norm(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[Any, int], Any], num_batches: int
) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` on ``num_batches`` batches.

    Quantizing weights and inputs shifts the mean and variance of what each BatchNorm normalizes, so after
    :func:`calibrate` the statistics of the float model no longer fit (BN re-estimation, as in AdaBN and AIMET's
    ``reestimate_bn_stats``, 100 batches there by default). Each BatchNorm with running statistics is reset and
    averages the per-batch mean and unbiased variance of its input over the batches (``momentum=None``);
    everything else stays in eval mode, the quantizers keep their scales (observers are not enabled here), no
    parameter changes. Modes and momenta are restored afterwards; ``num_batches_tracked`` counts the batches seen.

    If ``forward`` raises, or no batch arrives, the statistics are put back as they were and, after a failure,
    the error propagates.

    Returns:
        The number of batches the statistics were averaged over (0: nothing changed).
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORM_TYPES) and m.track_running_stats]
    if not norms:
        return 0
    saved = {bn: (bn.momentum, copy.deepcopy(bn.state_dict())) for bn in norms}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0  # stays 0 if ``forward`` raises: the statistics are put back below and the error goes through
    try:
        seen = _run_batches(batches, forward, num_batches)
    finally:
        for bn, (momentum, state) in saved.items():
            bn.momentum = momentum
            if seen == 0:
                bn.load_state_dict(state)
        for module, training in modes.items():
            module.training = training
    return seen


def calibrate_post_training(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any, int], Any],
    calibration_batches: int,
    bn_reestimation_batches: int,
) -> tuple[int, int]:
    """Our PTQ of a fake-quantized ``model``: :func:`calibrate` on ``calibration_batches`` batches, then
    :func:`reestimate_batch_norm` on ``bn_reestimation_batches`` (``0``: keep the float statistics).

    ``batches`` is iterated once for each step (a ``DataLoader``, not a one-shot iterator).

    Returns:
        The number of batches observed and the number the BatchNorm statistics were averaged over.
    """
    observed = calibrate(model, batches, forward, calibration_batches)
    averaged = reestimate_batch_norm(model, batches, forward, bn_reestimation_batches) if bn_reestimation_batches else 0
    return observed, averaged


def _run_batches(batches: Iterable[Any], forward: Callable[[Any, int], Any], num_batches: int) -> int:
    """``forward(batch, batch_idx)`` on up to ``num_batches`` of ``batches``; returns how many ran. Observers read
    their ranges on the host (calibration only), so a compiled model runs eagerly here."""
    seen = 0
    with torch.compiler.set_stance("force_eager"):
        for batch_idx, batch in enumerate(itertools.islice(batches, num_batches)):
            forward(batch, batch_idx)
            seen += 1
    return seen


def _searched(model: nn.Module) -> list[FakeQuantizer]:
    """The quantizers whose calibration searches the error-minimising range: every input quantizer and every
    learned-scale (LSQ) one. Observed weight quantizers keep their own observer (the current weights' range)."""
    observed_weights = {
        id(q)
        for m in model.modules()
        if isinstance(m, FakeQuantizedModule)
        for q in m.weight_quantizers().values()
        if not q.config.learned_scale
    }
    return [q for q in quantizers(model) if id(q) not in observed_weights]


@torch.no_grad()
def calibrate_for_training(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[Any, int], Any], num_batches: int
) -> int:
    """Start QAT from the PTQ calibration: give every quantizer of ``model`` the grid our PTQ would give it.

    Runs :func:`calibrate` with every input quantizer and every learned-scale (LSQ) quantizer on an MSE-searched
    range (``MSEObserver``: the clipping ratio of the observed range that minimises the squared quantization
    error, per channel for per-channel weights), observed weight quantizers on their own observer; so a model
    calibrated here has the scales ``QuantizationCallback(mode="ptq")`` gives the same model on the same batches
    (bit for bit where the plans agree; PTQ then re-estimates the BatchNorm statistics, which QAT trains).
    Then each quantizer keeps its own observer and config again, seeded with the calibrated range
    (``FakeQuantizer.start_from``): LSQ scales are learned from the searched ones, observers that keep updating
    move on from the searched range. Observers end enabled as they were.

    If ``forward`` raises, every quantizer is put back as it was (uncalibrated) and the error propagates.

    Returns:
        The number of batches observed.
    """
    searched = _searched(model)
    saved = {q: (q.config, q.observer, q.observer_enabled, copy.deepcopy(q.state_dict())) for q in quantizers(model)}
    for q in searched:
        search = dataclasses.replace(q.config, observer="mse", learned_scale=False)
        q.config, q.observer = search, build_observer(search, q.scale.numel()).to(q.scale.device)
    try:
        seen = calibrate(model, batches, forward, num_batches)
    except BaseException:
        for q, (config, observer, enabled, state) in saved.items():
            q.config, q.observer, q.observer_enabled = config, observer, enabled
            q.load_state_dict(state)
        raise
    for q, (config, observer, enabled, _) in saved.items():
        q.observer_enabled = enabled
        if q in searched:
            observed = bool(q.observer.initialized)  # False for a quantizer the batches never reached
            q.config, q.observer = config, observer
            if observed:
                q.start_from(q.scale.detach().clone(), q.zero_point.clone())
    return seen
