"""Our vectorised fake quantization against PyTorch's fused kernels: same values, same gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import choose_qparams, quant_range
from qat_lightning.quant.straight_through import fake_quantize_lsq, fake_quantize_ste

CASES = [(2, True), (4, True), (4, False), (8, False), (8, True), (16, False)]


def _data(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, ties: bool = True) -> torch.Tensor:
    """Random values spanning beyond the clamp range, plus exact half-step ties inside and at both edges of the
    range (or, without ``ties``, no value within 1e-3 steps of a tie)."""
    torch.manual_seed(qmax)
    span = (qmax - qmin) * scale
    lo = (qmin - zero_point) * scale
    x = lo - 0.3 * span + torch.rand(4000) * 1.6 * span
    if not ties:
        steps = x * torch.reciprocal(scale)
        return x[(steps - steps.floor() - 0.5).abs() > 1e-3]
    halves = torch.arange(qmin - 2, qmax + 2, dtype=torch.float32) - zero_point + 0.5
    return torch.cat([x, halves * scale])


def _qparams(bits: int, symmetric: bool, channels: int | None = None):
    lo, hi = torch.tensor(-1.7), torch.tensor(2.9)
    if channels is not None:
        lo, hi = lo * torch.arange(1.0, channels + 1), hi * torch.arange(1.0, channels + 1)
    return choose_qparams(lo, hi, bits, symmetric)


@pytest.mark.parametrize(("bits", "symmetric"), CASES)
def test_per_tensor_values_and_gradient_equal_torch_kernel(bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero_point = _qparams(bits, symmetric)
    x = _data(scale, zero_point, qmin, qmax)
    ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = fake_quantize_ste(ours_x, scale, zero_point, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zero_point, qmin, qmax)
    assert torch.equal(ours, ref)
    grad_out = torch.randn_like(x)
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert (ref_x.grad == 0).any() and (ref_x.grad != 0).any()


@pytest.mark.parametrize(("bits", "symmetric"), CASES)
def test_per_channel_values_and_gradient_equal_torch_kernel(bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero_point = _qparams(bits, symmetric, channels=3)
    x = torch.stack([_data(scale[c], zero_point[c], qmin, qmax) for c in range(3)], dim=1)  # (n, 3)
    ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = fake_quantize_ste(ours_x, scale.reshape(1, 3), zero_point.reshape(1, 3), qmin, qmax)
    ref = torch.fake_quantize_per_channel_affine(ref_x, scale, zero_point, 1, qmin, qmax)
    assert torch.equal(ours, ref)
    grad_out = torch.randn_like(x)
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(ours_x.grad, ref_x.grad)


@pytest.mark.parametrize(("bits", "symmetric"), CASES)
def test_lsq_per_tensor_gradients_equal_torch_learnable_kernel(bits, symmetric):
    """Away from half-step ties: torch's learnable backward rounds ``zero_point + x / scale`` in float32, which
    moves values within an ulp of a tie across it; its forward and ours round ``x / scale`` and then add the
    zero point, and we keep the forward's convention (checked against NumPy in test_lsq.py)."""
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero_point = _qparams(bits, symmetric)
    x = _data(scale, zero_point, qmin, qmax, ties=False)
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    grad_out = torch.randn_like(x)
    results = []
    for ours in (True, False):
        xg = x.clone().requires_grad_(True)
        sg = scale.clone().requires_grad_(True)
        if ours:
            out = fake_quantize_lsq(xg, sg, zero_point, qmin, qmax, factor)
        else:
            out = torch._fake_quantize_learnable_per_tensor_affine(
                xg, sg.reshape(1), zero_point.float().reshape(1), qmin, qmax, factor
            )
        out.backward(grad_out)
        results.append((out.detach(), xg.grad, sg.grad))
    (out, grad_x, grad_scale), (ref, ref_grad_x, ref_grad_scale) = results
    assert torch.equal(out, ref)
    assert torch.equal(grad_x, ref_grad_x)
    assert grad_scale.shape == scale.shape
    assert grad_scale.item() == pytest.approx(ref_grad_scale.item(), rel=1e-5, abs=1e-7)


def test_lsq_per_channel_gradients_equal_torch_learnable_kernel():
    qmin, qmax = quant_range(4, True)
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    scale = w.flatten(1).abs().amax(1) / 6  # clips the largest weights of every channel
    zero_point = torch.zeros(6)
    factor = 1.0 / math.sqrt(w[0].numel() * qmax)
    grad_out = torch.randn_like(w)

    wg, sg = w.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    fake_quantize_lsq(wg, sg.reshape(6, 1, 1, 1), zero_point.reshape(6, 1, 1, 1), qmin, qmax, factor).backward(grad_out)
    rg, rs = w.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    torch._fake_quantize_learnable_per_channel_affine(rg, rs, zero_point, 0, qmin, qmax, factor).backward(grad_out)
    assert torch.equal(wg.grad, rg.grad)
    torch.testing.assert_close(sg.grad, rs.grad, rtol=1e-5, atol=1e-7)


def test_output_keeps_the_input_dtype_and_values():
    qmin, qmax = quant_range(8, False)
    scale, zero_point = _qparams(8, False)
    x = torch.randn(100).to(torch.bfloat16).requires_grad_(True)
    out = fake_quantize_ste(x, scale, zero_point, qmin, qmax)
    assert out.dtype == torch.bfloat16
    expected = torch.fake_quantize_per_tensor_affine(x.detach().float(), scale, zero_point, qmin, qmax)
    assert torch.equal(out.float(), expected.to(torch.bfloat16).float())
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(2.0**-20, 2.0**20, width=32),
    zero_point=st.integers(0, 255),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
)
def test_input_gradient_at_the_range_edges_equals_torch_kernel(scale, zero_point, bits, symmetric):
    """The STE mask is exact for any scale: on the float32 values next to both edges of the clamp range (and
    at their half-step ties) it equals torch's cachemask kernel."""
    qmin, qmax = quant_range(bits, symmetric)
    zero_point = 0 if symmetric else min(zero_point, qmax)
    scale_t, zero_point_t = torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
    edges = torch.tensor([qmin - zero_point - 0.5, qmax - zero_point + 0.5]) * scale_t
    neighbours = torch.arange(-40, 41, dtype=torch.int32)  # the 40 float32 values on each side of each edge
    x = torch.cat([(e.reshape(1).view(torch.int32) + neighbours).view(torch.float32) for e in edges])
    ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fake_quantize_ste(ours_x, scale_t, zero_point_t, qmin, qmax).sum().backward()
    torch.fake_quantize_per_tensor_affine(ref_x, scale_t, zero_point_t, qmin, qmax).sum().backward()
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert (ref_x.grad == 0).any() and (ref_x.grad == 1).any()
