"""``FakeQuantizer``: when it observes, when it rounds, and what it saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat_lightning.quant import FakeQuantizer, QuantizerConfig, activation_config, quant_range, weight_config


def _calibrated(config: QuantizerConfig, x: torch.Tensor, num_channels: int = 1) -> FakeQuantizer:
    quantizer = FakeQuantizer(config, num_channels).train()
    quantizer(x)
    return quantizer


def test_passes_through_before_calibration():
    quantizer = FakeQuantizer(activation_config(4)).eval()
    x = torch.randn(4, 10)
    assert not quantizer.calibrated
    assert torch.equal(quantizer(x), x)
    assert not quantizer.calibrated and not bool(quantizer.observer.initialized)
    # In training mode but with the observer disabled there is nothing to quantize with either.
    quantizer.train().observer_enabled = False
    assert torch.equal(quantizer(x), x)
    assert not quantizer.calibrated


@pytest.mark.parametrize(
    ("config", "shape"),
    [(activation_config(4), (16, 12)), (weight_config(3), (6, 4, 3, 3)), (weight_config(8), (10, 7))],
    ids=["activation4", "weight3", "weight8"],
)
def test_first_training_call_calibrates_and_rounds(config, shape, np_ref):
    x = torch.randn(shape) * 3
    quantizer = FakeQuantizer(config, num_channels=shape[0]).train()
    out = quantizer(x)
    assert quantizer.calibrated
    axis = 0 if config.per_channel else None
    ref_scale, ref_zero_point = np_ref.choose_qparams(*np_ref.min_max(x.numpy(), axis), config.bits, config.symmetric)
    np.testing.assert_array_equal(quantizer.scale.numpy(), ref_scale)
    np.testing.assert_array_equal(quantizer.zero_point.numpy(), ref_zero_point)
    np_ref.assert_fake_quant_equal(
        out.detach().numpy(), x.numpy(), ref_scale, ref_zero_point, config.bits, config.symmetric, axis
    )
    np.testing.assert_array_equal(
        quantizer.quantize(x).numpy(),
        np_ref.quantize(x.numpy(), ref_scale, ref_zero_point, config.bits, config.symmetric, axis),
    )


def test_observer_updates_only_in_train_mode_with_observer_enabled(np_ref):
    config = QuantizerConfig(bits=4, observer="minmax")
    x1, x2 = torch.randn(100), torch.randn(100) * 10
    quantizer = _calibrated(config, x1)
    scale1 = quantizer.scale.clone()

    quantizer.eval()  # eval: stored parameters, observer untouched
    out = quantizer(x2)
    assert torch.equal(quantizer.scale, scale1)
    assert quantizer.observer.max_val.item() == x1.max().item()
    np_ref.assert_fake_quant_equal(out.numpy(), x2.numpy(), scale1.numpy(), quantizer.zero_point.numpy(), 4, False)
    assert out.max().item() < x2.max().item()  # clamped to the old range

    quantizer.train().observer_enabled = False  # frozen: same
    quantizer(x2)
    assert torch.equal(quantizer.scale, scale1)

    quantizer.observer_enabled = True  # train + enabled: the range grows to x2's
    quantizer(x2)
    assert quantizer.observer.max_val.item() == max(x1.max().item(), x2.max().item())
    ref_scale, _ = np_ref.choose_qparams(min(x1.min(), x2.min()).item(), max(x1.max(), x2.max()).item(), 4, False)
    assert quantizer.scale.item() == ref_scale


def test_frozen_scales_do_not_move():
    quantizer = _calibrated(weight_config(4), torch.randn(8, 3), num_channels=8)
    quantizer.observer_enabled = False
    frozen = {k: v.clone() for k, v in quantizer.state_dict().items() if torch.is_tensor(v)}
    for _ in range(5):
        quantizer(torch.randn(8, 3) * 100)
    for key, value in frozen.items():
        assert torch.equal(quantizer.state_dict()[key], value), key


def test_fake_quant_disabled_still_observes():
    quantizer = FakeQuantizer(activation_config(4)).train()
    quantizer.fake_quant_enabled = False
    x = torch.randn(50)
    assert torch.equal(quantizer(x), x)
    assert quantizer.calibrated and quantizer.observer.min_val.item() == x.min().item()


def test_gradient_flows_through():
    quantizer = _calibrated(activation_config(8), torch.linspace(-2, 2, 100))
    x = torch.linspace(-1, 1, 20, requires_grad=True)
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(20))


@pytest.mark.parametrize(("config", "channels"), [(activation_config(4), 1), (weight_config(2), 6)])
def test_state_dict_round_trip_restores_calibrated(config, channels):
    x = torch.randn(6, 9) * 2
    quantizer = _calibrated(config, x, channels)
    state = quantizer.state_dict()
    assert {"scale", "zero_point", "observer.min_val", "observer.max_val", "observer.initialized"} <= set(state)

    restored = FakeQuantizer(config, channels)
    assert not restored.calibrated
    restored.load_state_dict(state)
    assert restored.calibrated
    quantizer.eval(), restored.eval()
    probe = torch.randn(6, 9) * 3
    assert torch.equal(restored(probe), quantizer(probe))
    assert not torch.equal(restored(probe), probe)

    # An uncalibrated checkpoint loads as uncalibrated (passes through).
    fresh = FakeQuantizer(config, channels)
    fresh.load_state_dict(FakeQuantizer(config, channels).state_dict())
    assert not fresh.calibrated
    assert torch.equal(fresh.eval()(probe), probe)


def test_extra_repr_describes_the_config():
    text = repr(FakeQuantizer(weight_config(3), num_channels=4))
    assert "bits=3" in text and "symmetric" in text and "per_channel" in text


@pytest.mark.parametrize("learned_scale", [False, True])
def test_called_twice_before_backward_uses_each_calls_parameters(learned_scale):
    """A layer used twice per step: the second call updates the observer's scale in place, and the first call's
    backward still uses the scale and zero point of the first call."""
    q = FakeQuantizer(QuantizerConfig(bits=4, observer="minmax", learned_scale=learned_scale))
    q.train()
    x1 = torch.linspace(-1.0, 1.0, 41).requires_grad_(True)
    out1 = q(x1)
    scale1, zero_point1 = q.scale.detach().clone(), q.zero_point.clone()
    x2 = torch.linspace(-3.0, 3.0, 41).requires_grad_(True)
    out2 = q(x2)
    if not learned_scale:
        assert q.scale.item() > scale1.item()  # the wider second batch moved the shared scale
    (out1.sum() + out2.sum()).backward()
    qmin, qmax = quant_range(4, False)
    codes = torch.round(x1.detach() * torch.reciprocal(scale1)) + zero_point1
    assert torch.equal(x1.grad, ((codes >= qmin) & (codes <= qmax)).float())
