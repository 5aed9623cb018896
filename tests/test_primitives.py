"""The pure quantization math against an independent NumPy computation (see ``conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qat_lightning.quant import check_bits, choose_qparams, dequantize, fake_quantize, quant_range, quantize

BITS = (2, 3, 4, 8, 16)
SCHEMES = (True, False)  # symmetric, asymmetric
LARGE = float(np.float32(1e36))  # far beyond any real range, yet max - min stays finite in float32


def _qparams(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None = None):
    """Torch qparams of ``x``'s range (per tensor or per slice along ``axis``)."""
    if axis is None:
        return choose_qparams(x.min(), x.max(), bits, symmetric)
    rows = x.movedim(axis, 0).flatten(1)
    return choose_qparams(rows.min(1).values, rows.max(1).values, bits, symmetric)


def _check_all(x: torch.Tensor, bits: int, symmetric: bool, np_ref, axis: int | None = None, shrink: float = 1.0):
    """choose_qparams, quantize, dequantize and fake_quantize of ``x`` all agree with NumPy.

    ``shrink`` < 1 takes the qparams of a narrower range than ``x``'s, so that the clamp is exercised.
    """
    xn = x.numpy()
    lo, hi = np_ref.min_max(xn, axis)
    lo, hi = np.float32(lo * shrink), np.float32(hi * shrink)
    scale, zero_point = choose_qparams(torch.as_tensor(lo), torch.as_tensor(hi), bits, symmetric)
    ref_scale, ref_zero_point = np_ref.choose_qparams(lo, hi, bits, symmetric)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert scale.shape == zero_point.shape == np.shape(lo)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)

    q = quantize(x, scale, zero_point, bits, symmetric, axis)
    assert q.dtype == torch.int32 and q.shape == x.shape
    np.testing.assert_array_equal(q.numpy(), np_ref.quantize(xn, ref_scale, ref_zero_point, bits, symmetric, axis))
    qmin, qmax = np_ref.quant_range(bits, symmetric)
    assert qmin <= q.min().item() and q.max().item() <= qmax

    dq = dequantize(q, scale, zero_point, axis)
    assert dq.dtype == torch.float32
    np.testing.assert_array_equal(dq.numpy(), np_ref.dequantize(q.numpy(), ref_scale, ref_zero_point, axis))

    fq = fake_quantize(x, scale, zero_point, bits, symmetric, axis)
    assert fq.shape == x.shape
    np_ref.assert_fake_quant_equal(fq.numpy(), xn, ref_scale, ref_zero_point, bits, symmetric, axis)
    return q, fq


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_quant_range(bits, symmetric, np_ref):
    assert quant_range(bits, symmetric) == np_ref.quant_range(bits, symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    assert qmax - qmin + 1 == 2**bits


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_per_tensor_matches_numpy(bits, symmetric, shrink, np_ref):
    x = torch.randn(4096) * 3 + 0.7
    q, _ = _check_all(x, bits, symmetric, np_ref, shrink=shrink)
    qmin, qmax = quant_range(bits, symmetric)
    if shrink < 1:  # values beyond the narrowed range land on the grid ends
        assert (q == qmax).any() and (q == qmin).any()


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "axis"), [((6, 3, 5, 5), 0), ((4, 7, 9), 1), ((5, 8), -1)])
def test_per_channel_matches_numpy(bits, symmetric, shape, axis, np_ref):
    # Channels with very different ranges, one of them all negative and one all positive.
    x = torch.randn(shape)
    channels = x.shape[axis]
    spread = torch.logspace(-2, 2, channels)
    x = x * spread.reshape([-1 if d == axis % x.dim() else 1 for d in range(x.dim())])
    x.select(axis, 0).abs_().neg_()
    x.select(axis, 1).abs_().add_(0.5)
    _check_all(x, bits, symmetric, np_ref, axis=axis)
    _check_all(x, bits, symmetric, np_ref, axis=axis, shrink=0.6)


def test_per_channel_uses_one_scale_per_channel():
    x = torch.stack([torch.linspace(-1, 1, 11), torch.linspace(-100, 100, 11)])
    scale, zero_point = _qparams(x, 8, True, axis=0)
    torch.testing.assert_close(scale, torch.tensor([1 / 127.5, 100 / 127.5]))
    fq = fake_quantize(x, scale, zero_point, 8, True, axis=0)
    # The small channel keeps its resolution: a per-tensor scale of 100/127.5 would round it all to 0.
    assert (fq[0] - x[0]).abs().max() <= scale[0] / 2 + 1e-7
    assert fq[0].unique().numel() == 11


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "values",
    [
        pytest.param(torch.full((64,), 3.25), id="constant_positive"),
        pytest.param(torch.full((64,), -0.75), id="constant_negative"),
        pytest.param(torch.zeros(64), id="all_zeros"),
        pytest.param(-torch.rand(256) * 5 - 1, id="all_negative"),
        pytest.param(torch.rand(256) * 5 + 1, id="all_positive"),
        pytest.param(torch.linspace(-1e30, 1e30, 257), id="huge_range"),
        pytest.param(torch.linspace(-3e30, 1e29, 257), id="huge_skewed_range"),
        pytest.param(torch.linspace(-1e-30, 1e-30, 257), id="tiny_range"),
    ],
)
def test_edge_cases_match_numpy(values, bits, symmetric, np_ref):
    _, fq = _check_all(values, bits, symmetric, np_ref)
    assert torch.isfinite(fq).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=arrays(
        np.float32,
        st.integers(1, 40),
        elements=st.floats(-LARGE, LARGE, width=32, allow_nan=False, allow_infinity=False),
    ),
    bits=st.integers(2, 16),
    symmetric=st.booleans(),
    shrink=st.sampled_from([1.0, 0.5, 1e-3]),
)
def test_any_finite_tensor_matches_numpy(values, bits, symmetric, shrink, np_ref):
    """Property: for any finite float32 tensor (subnormals and 1e36 included) and any bit width."""
    x = torch.from_numpy(values)
    lo, hi = np.float32(values.min() * shrink), np.float32(values.max() * shrink)
    scale, zero_point = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    ref_scale, ref_zero_point = np_ref.choose_qparams(lo, hi, bits, symmetric)
    assert scale.item() == ref_scale and zero_point.item() == ref_zero_point
    q = quantize(x, scale, zero_point, bits, symmetric)
    np.testing.assert_array_equal(q.numpy(), np_ref.quantize(values, ref_scale, ref_zero_point, bits, symmetric))
    dq = dequantize(q, scale, zero_point)
    np.testing.assert_array_equal(dq.numpy(), np_ref.dequantize(q.numpy(), ref_scale, ref_zero_point))
    assert torch.isfinite(dq).all()
    fq = fake_quantize(x, scale, zero_point, bits, symmetric)
    np_ref.assert_fake_quant_equal(fq.numpy(), values, ref_scale, ref_zero_point, bits, symmetric)


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_min_equal_max(bits, symmetric, np_ref):
    for value in (0.0, 2.5, -4.0):
        scale, zero_point = choose_qparams(torch.tensor(value), torch.tensor(value), bits, symmetric)
        ref_scale, ref_zero_point = np_ref.choose_qparams(value, value, bits, symmetric)
        assert scale.item() == ref_scale and zero_point.item() == ref_zero_point
        assert scale.item() >= np.finfo(np.float32).eps  # never a zero scale, even for an all-zero range
    scale, zero_point = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), bits, symmetric)
    zeros = torch.zeros(10)
    assert torch.equal(fake_quantize(zeros, scale, zero_point, bits, symmetric), zeros)


@pytest.mark.parametrize("bits", BITS)
def test_one_sided_ranges_pin_the_zero_point(bits):
    qmin, qmax = quant_range(bits, symmetric=False)
    # All positive: the range is widened down to 0, which maps to qmin.
    _, zero_point = choose_qparams(torch.tensor(2.0), torch.tensor(5.0), bits, symmetric=False)
    assert zero_point.item() == qmin
    # All negative: widened up to 0, which maps to qmax.
    _, zero_point = choose_qparams(torch.tensor(-5.0), torch.tensor(-2.0), bits, symmetric=False)
    assert zero_point.item() == qmax


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_point_in_range_and_zero_exact(bits, np_ref):
    """For any range, the zero point lies on the grid and 0.0 quantizes and dequantizes to exactly 0.0."""
    qmin, qmax = quant_range(bits, symmetric=False)
    generator = torch.Generator().manual_seed(bits)
    magnitudes = 10.0 ** torch.randint(-30, 31, (2, 500), generator=generator).float()
    lo = -torch.rand(500, generator=generator) * magnitudes[0]
    hi = torch.rand(500, generator=generator) * magnitudes[1]
    lo[:50] = hi[:50] * 0.5  # some all-positive ranges
    hi[50:100] = lo[50:100] * 0.5  # some all-negative ranges
    scale, zero_point = choose_qparams(lo, hi, bits, symmetric=False)
    ref_scale, ref_zero_point = np_ref.choose_qparams(lo.numpy(), hi.numpy(), bits, symmetric=False)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)
    assert ((qmin <= zero_point) & (zero_point <= qmax)).all()
    zeros = torch.zeros(500, 3)
    q = quantize(zeros, scale, zero_point, bits, symmetric=False, axis=0)
    assert torch.equal(q, zero_point[:, None].expand(500, 3))
    assert torch.equal(dequantize(q, scale, zero_point, axis=0), zeros)
    assert torch.equal(fake_quantize(zeros, scale, zero_point, bits, symmetric=False, axis=0), zeros)
    assert torch.equal(fake_quantize(torch.zeros(5), scale[7], zero_point[7], bits, symmetric=False), torch.zeros(5))


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_scale_uses_max_abs(bits, symmetric):
    scale, zero_point = choose_qparams(torch.tensor(-6.0), torch.tensor(1.5), bits, symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        assert zero_point.item() == 0
        assert scale.item() == pytest.approx(6.0 / ((qmax - qmin) / 2), rel=1e-7)
    else:
        assert scale.item() == pytest.approx(7.5 / (qmax - qmin), rel=1e-7)


@pytest.mark.parametrize("symmetric", SCHEMES)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("axis", [None, 1])
def test_straight_through_gradient(bits, symmetric, axis, np_ref):
    """d fake_quantize / dx is 1 where round(x/scale)+zp falls inside [qmin, qmax] and 0 outside."""
    x = torch.randn(3, 4, 50) * 4
    if axis is None:
        scale, zero_point = choose_qparams(torch.tensor(-2.0), torch.tensor(3.0), bits, symmetric)
    else:
        scale, zero_point = choose_qparams(-torch.arange(1.0, 5.0), torch.arange(1.0, 5.0) * 1.5, bits, symmetric)
    x.requires_grad_(True)
    fake_quantize(x, scale, zero_point, bits, symmetric, axis).sum().backward()
    xn = x.detach().numpy()
    sn, zn = scale.numpy(), zero_point.numpy()
    qmin, qmax = quant_range(bits, symmetric)
    s = sn if axis is None else sn.reshape(1, -1, 1)
    z = zn if axis is None else zn.reshape(1, -1, 1)
    unclamped = np.round(xn * (np.float32(1.0) / s)) + z
    inside = (unclamped >= qmin) & (unclamped <= qmax)
    assert inside.any() and (~inside).any()  # both branches are exercised
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(np.float32))


@pytest.mark.parametrize("bad", [1, 17, 0, -4, 4.0, True, "4", None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 2\.\.16"):
        check_bits(bad)
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 2\.\.16"):
        quant_range(bad, symmetric=True)


def test_check_bits_names_the_argument():
    assert check_bits(2) == 2 and check_bits(16) == 16
    with pytest.raises(ValueError, match=r"`activation_bits` must be an integer in 2\.\.16, got 1"):
        check_bits(1, "activation_bits")
