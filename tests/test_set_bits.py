"""A quantizer owns its grid: ``FakeQuantizer.set_bits`` moves config, integer range and scales together, so a
snapshot of a 4-bit QAT layer at 2, 8 or 16 bits computes on that width's grid (checked against NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_choose_qparams, np_fake_quantize, np_quant_range
from torch import nn

from qat_lightning.nn import apply_plan, plan_quantization, quantized_snapshot


def _four_bit_linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    apply_plan(model, plan_quantization(model, 4, first_last_bits=None, learned_scale=False))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 16))
    return model.eval()


def _regridded(scale: np.ndarray, zero_point: np.ndarray, old_bits: int, bits: int, symmetric: bool):
    """The NumPy scale and zero point of the same clipping range on a ``bits``-bit grid."""
    qmin, qmax = np_quant_range(old_bits, symmetric)
    if symmetric:
        high = scale * np.float32((qmax - qmin) / 2)
        return np_choose_qparams(-high, high, bits, True)
    return np_choose_qparams((qmin - zero_point) * scale, (qmax - zero_point) * scale, bits, False)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_snapshot_of_a_4_bit_layer_computes_on_the_requested_grid(bits: int) -> None:
    model = _four_bit_linear()
    layer = model[0]
    w_scale, i_scale = layer.weight_quantizer.scale.numpy(), layer.input_quantizer.scale.numpy()
    i_zero = layer.input_quantizer.zero_point.numpy()

    snapshot = quantized_snapshot(model, bits)
    snap = snapshot[0]

    codes = snap.weight_quantizer.quantize(snap.weight.detach()).numpy()
    qmin, qmax = np_quant_range(bits, symmetric=True)
    assert codes.min() >= qmin and codes.max() <= qmax
    if bits > 4:  # the grid is finer than the trained one: codes reach beyond the 4-bit range
        assert np.abs(codes).max() > 8
    else:
        assert max(len(np.unique(row)) for row in codes) <= 2**bits
    new_w_scale, _ = _regridded(w_scale, np.zeros_like(w_scale, dtype=np.int32), 4, bits, True)
    new_i_scale, new_i_zero = _regridded(i_scale, i_zero, 4, bits, False)
    x = torch.randn(64, 16)
    w = np_fake_quantize(layer.weight.detach().numpy(), new_w_scale, np.zeros(8, np.int32), bits, True, axis=0)
    xq = np_fake_quantize(x.numpy(), new_i_scale, new_i_zero, bits, False)
    expected = xq @ w.T + layer.bias.detach().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(snapshot(x).numpy(), expected, rtol=0, atol=1e-5)
    assert snap.weight_quantizer.config.bits == snap.input_quantizer.config.bits == bits
    assert model[0].weight_quantizer.config.bits == 4  # the model itself is untouched
