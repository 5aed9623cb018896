"""Observers track ranges exactly as their formulas say, per tensor and per channel, and checkpoint them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat_lightning.quant import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantizerConfig,
    activation_config,
    build_observer,
    weight_config,
)


def _batches(n: int = 6, shape=(8, 5, 3)) -> list[torch.Tensor]:
    # Batches with shifting location and spread, so running min/max and averages all move.
    return [torch.randn(shape) * (1 + i) + (i - 2.5) for i in range(n)]


@pytest.mark.parametrize(("per_channel", "axis"), [(False, 0), (True, 0), (True, 1), (True, 2)])
def test_minmax_tracks_running_extremes(per_channel, axis, np_ref):
    batches = _batches()
    channels = batches[0].shape[axis]
    config = QuantizerConfig(bits=8, per_channel=per_channel, channel_axis=axis, observer="minmax")
    observer = MinMaxObserver(config, num_channels=channels)
    ref_axis = axis if per_channel else None
    running_min, running_max = np_ref.min_max(batches[0].numpy(), ref_axis)
    for x in batches:
        assert observer(x) is x  # observers never change the tensor
        lo, hi = np_ref.min_max(x.numpy(), ref_axis)
        running_min, running_max = np.minimum(running_min, lo), np.maximum(running_max, hi)
        assert observer.min_val.shape == ((channels,) if per_channel else ())
        np.testing.assert_array_equal(observer.min_val.numpy(), running_min)
        np.testing.assert_array_equal(observer.max_val.numpy(), running_max)


def test_minmax_first_batch_is_not_mixed_with_the_zero_init():
    """The buffers start at 0, but an all-positive first batch must give its own minimum, not 0."""
    observer = MinMaxObserver(QuantizerConfig(observer="minmax"))
    observer(torch.tensor([2.0, 3.0, 5.0]))
    assert observer.min_val.item() == 2.0 and observer.max_val.item() == 5.0
    assert bool(observer.initialized)


@pytest.mark.parametrize("constant", [0.01, 0.3, 1.0])
@pytest.mark.parametrize(("per_channel", "axis"), [(False, 0), (True, 1)])
def test_moving_average_matches_hand_loop(constant, per_channel, axis, np_ref):
    batches = _batches()
    config = QuantizerConfig(
        bits=8, per_channel=per_channel, channel_axis=axis, observer="moving_average", averaging_constant=constant
    )
    observer = MovingAverageMinMaxObserver(config, num_channels=batches[0].shape[axis])
    ref_axis = axis if per_channel else None
    avg_min = avg_max = None
    for x in batches:
        observer(x)
        lo, hi = (np.asarray(v, dtype=np.float64) for v in np_ref.min_max(x.numpy(), ref_axis))
        if avg_min is None:  # the first batch sets the range
            avg_min, avg_max = lo, hi
        else:
            avg_min = avg_min + constant * (lo - avg_min)
            avg_max = avg_max + constant * (hi - avg_max)
        np.testing.assert_allclose(observer.min_val.numpy(), avg_min, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(observer.max_val.numpy(), avg_max, rtol=1e-6, atol=1e-6)
    if constant < 1:  # the average lags behind the newest batch
        assert not np.allclose(avg_max, np_ref.min_max(batches[-1].numpy(), ref_axis)[1])


@pytest.mark.parametrize("config", [weight_config(4), activation_config(8)], ids=["weight", "activation"])
def test_qparams_match_numpy(config, np_ref):
    x = torch.randn(6, 3, 3, 3) * 2 + 0.3
    observer = build_observer(config, num_channels=6)
    observer(x)
    scale, zero_point = observer.qparams()
    axis = config.channel_axis if config.per_channel else None
    ref_scale, ref_zero_point = np_ref.choose_qparams(*np_ref.min_max(x.numpy(), axis), config.bits, config.symmetric)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)


def test_build_observer_picks_the_named_class():
    assert type(build_observer(QuantizerConfig(observer="minmax"))) is MinMaxObserver
    assert type(build_observer(QuantizerConfig(observer="moving_average"))) is MovingAverageMinMaxObserver


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_state_in_state_dict(cls):
    config = QuantizerConfig(bits=4, per_channel=True, channel_axis=1, averaging_constant=0.5)
    observer = cls(config, num_channels=5)
    for x in _batches(3):
        observer(x)
    state = observer.state_dict()
    assert set(state) == {"min_val", "max_val", "initialized", "skipped"}
    restored = cls(config, num_channels=5)
    assert not bool(restored.initialized)
    restored.load_state_dict(state)
    assert bool(restored.initialized)
    for name in ("min_val", "max_val"):
        torch.testing.assert_close(getattr(restored, name), getattr(observer, name), rtol=0, atol=0)
    for got, want in zip(restored.qparams(), observer.qparams(), strict=True):
        assert torch.equal(got, want)
    # Continuing from the restored state gives the same result as continuing the original.
    x = torch.randn(8, 5, 3) * 10
    observer(x)
    restored(x)
    assert torch.equal(restored.min_val, observer.min_val) and torch.equal(restored.max_val, observer.max_val)


def test_quantizer_config_validation():
    with pytest.raises(ValueError, match=r"`observer` must be one of \('minmax', 'moving_average', 'mse'\)"):
        QuantizerConfig(observer="histogram")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"`averaging_constant` must be in \(0, 1\]"):
            QuantizerConfig(averaging_constant=bad)
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 2\.\.16"):
        QuantizerConfig(bits=1)


def test_default_configs():
    w, a = weight_config(4), activation_config(6)
    assert (w.bits, w.symmetric, w.per_channel, w.channel_axis, w.averaging_constant) == (4, True, True, 0, 1.0)
    assert (a.bits, a.symmetric, a.per_channel) == (6, False, False)
