"""The fused (inductor-compiled) fake quantization: torch's kernels' numbers, the passes' gradients, a fallback."""

import logging

import numpy as np
import pytest
import torch
import torch._dynamo

from qat_lightning.quant import (
    FakeQuantizer,
    activation_config,
    choose_qparams,
    error,
    fused,
    quant_range,
    straight_through,
)


@pytest.fixture(autouse=True)
def _fuse_everything(monkeypatch):
    """Every CPU call takes the fused path (the real threshold skips tensors this small), with a fresh dynamo cache
    (past its recompile limit dynamo would run the passes itself)."""
    monkeypatch.setattr(fused, "MIN_FUSED_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_failed", set())
    torch._dynamo.reset()


def _data(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Random values beyond both ends of the range, exact half-step ties, and the 8 float32 neighbours of each
    range edge (``(qmin - zp - 0.5) * s`` and ``(qmax - zp + 0.5) * s``)."""
    span = (qmax - qmin) * scale
    lo = (qmin - zero_point) * scale
    x = lo - 0.3 * span + torch.rand(3000) * 1.6 * span
    ties = (torch.arange(qmin - 2, qmax + 2, dtype=torch.float32) - zero_point + 0.5) * scale
    edges = torch.stack([(qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale]).float()
    neighbours = [edges]
    for direction in (float("inf"), float("-inf")):
        step = edges
        for _ in range(4):
            step = torch.nextafter(step, torch.full_like(step, direction))
            neighbours.append(step)
    return torch.cat([x, ties, *neighbours])


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True)])
def test_fused_lsq_values_and_input_gradient_equal_torch_kernel(bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero_point = choose_qparams(torch.tensor(-1.7), torch.tensor(2.9), bits, symmetric)
    x = _data(scale, zero_point, qmin, qmax)
    ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = fused.fake_quantize_lsq(ours_x, scale.clone().requires_grad_(True), zero_point, qmin, qmax, 0.01)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zero_point, qmin, qmax)
    assert "Compiled" in type(ours.grad_fn).__name__  # the fused kernel ran, not the passes
    assert torch.equal(ours, ref)
    grad_out = torch.randn_like(x)
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert (ref_x.grad == 0).any() and (ref_x.grad != 0).any()


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_lsq_equals_the_passes(per_channel):
    qmin, qmax = quant_range(4, not per_channel)
    channels = 3 if per_channel else 1
    lo, hi = torch.tensor(-1.7) * torch.arange(1.0, channels + 1), torch.tensor(2.9) * torch.arange(1.0, channels + 1)
    scale, zero_point = choose_qparams(lo, hi, 4, not per_channel)
    x = torch.stack([_data(scale[c], zero_point[c], qmin, qmax) for c in range(channels)], dim=1)  # (n, channels)
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    else:
        scale, zero_point = scale.reshape(1, channels), zero_point.reshape(1, channels)
    grad_out = torch.randn_like(x)
    results = []
    for function in (fused.fake_quantize_lsq, straight_through.fake_quantize_lsq):
        xx, ss = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        out = function(xx, ss, zero_point, qmin, qmax, 0.01)
        out.backward(grad_out)
        results.append((out.detach(), xx.grad, ss.grad))
    (out, x_grad, scale_grad), (ref_out, ref_x_grad, ref_scale_grad) = results
    assert torch.equal(out, ref_out)
    assert torch.equal(x_grad, ref_x_grad)
    torch.testing.assert_close(scale_grad, ref_scale_grad, rtol=1e-5, atol=0.0)  # one sum, in another order
    assert (ref_scale_grad != 0).all()


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (8, True)])
def test_fused_values_equal_torch_kernel(bits, symmetric):
    """The recomputing kernel (``fake_quantize_values``, no gradient) gives torch's values bit for bit."""
    qmin, qmax = quant_range(bits, symmetric)
    scale, zero_point = choose_qparams(torch.tensor(-1.7), torch.tensor(2.9), bits, symmetric)
    x = _data(scale, zero_point, qmin, qmax)
    fused._compiled.pop("values", None)
    ours = fused.fake_quantize_values(x, scale, zero_point.float(), qmin, qmax)
    assert "values" in fused._compiled and not fused._failed  # the kernel ran, not the passes
    assert torch.equal(ours, torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax))
    assert torch.equal(ours, straight_through.fake_quantize_values(x, scale, zero_point.float(), qmin, qmax))


@pytest.mark.parametrize(("bits", "symmetric"), [(2, False), (4, True)])
def test_fused_candidate_errors_equal_numpy_and_the_passes(bits, symmetric):
    """The clipping-search kernel: each row's mean squared error on each candidate grid, against NumPy in float64
    on torch's own fake-quantized values, and against the unfused passes."""
    torch.manual_seed(0)
    qmin, qmax = quant_range(bits, symmetric)
    sample = torch.randn(3, 2000) * torch.tensor([[0.5], [1.0], [3.0]])
    ratios = torch.linspace(0.2, 1.0, 7)
    scale, zero_point = choose_qparams(
        sample.amin(1, keepdim=True) * ratios, sample.amax(1, keepdim=True) * ratios, bits, symmetric
    )
    fused._compiled.pop("errors", None)
    torch._dynamo.utils.counters.clear()
    with torch.compiler.set_stance("force_eager"):  # as calibration runs the model: our kernel still compiles
        ours = fused.candidate_errors(sample, scale, zero_point, qmin, qmax)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and not fused._failed  # compiled, not the passes
    assert ours.shape == (3, 7) and ours.dtype == torch.float32
    expected = np.empty((3, 7))
    for c in range(3):
        for r in range(7):
            rounded = torch.fake_quantize_per_tensor_affine(sample[c], scale[c, r], zero_point[c, r], qmin, qmax)
            expected[c, r] = ((rounded.double() - sample[c].double()) ** 2).mean().item()
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-5)
    passes = error.candidate_errors(sample, scale, zero_point, qmin, qmax)
    torch.testing.assert_close(ours, passes, rtol=1e-5, atol=0)
    assert torch.equal(ours.argmin(dim=1), passes.argmin(dim=1))


def test_quantizer_falls_back_to_the_passes_once(monkeypatch, caplog):
    def no_compiler(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_kernel", no_compiler)
    quantizer = FakeQuantizer(activation_config(4, learned_scale=True))
    x = torch.randn(4, 8, 5, 5)
    quantizer(x)  # initialises the LSQ scale; the next calls round with it
    with caplog.at_level(logging.WARNING, logger="qat_lightning.quant.fused"):
        out = quantizer(x)
        quantizer(x)
    assert [r.getMessage() for r in caplog.records] == [
        "qat_lightning: fused fake quantization unavailable for lsq (no C++ compiler); using vectorised passes."
    ]
    expected = torch.fake_quantize_per_tensor_affine(x, quantizer.scale.detach(), quantizer.zero_point, 0, 15)
    assert torch.equal(out, expected)


def test_inside_torch_compile_the_caller_fuses(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "_kernel", lambda name: calls.append(name))
    torch._dynamo.reset()
    quantizer = FakeQuantizer(activation_config(4, learned_scale=True))
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        quantizer(x)  # initialises the LSQ scale
    out = torch.compile(quantizer, backend="aot_eager", fullgraph=True)(x)
    assert calls == []
    expected = torch.fake_quantize_per_tensor_affine(x, quantizer.scale.detach(), quantizer.zero_point, 0, 15)
    assert torch.equal(out, expected)
    torch._dynamo.reset()


def test_calibrating_a_torchvision_resnet18_keeps_the_search_kernel(monkeypatch):
    """QAT's calibrated start on a model we did not write: its searches (per-tensor inputs, per-channel weights of
    3 to 512 channels, 8-bit first/last and 4-bit layers, samples growing each batch) once met more kinds of call
    than dynamo's recompile limit (8) and lost the kernel. Grids passed as tensors and fresh (non-view) inputs keep it
    to per tensor / per channel times short / long rows."""
    import torchvision

    from qat_lightning.calibration import calibrate_for_training
    from qat_lightning.nn import apply_plan, plan_quantization

    monkeypatch.setattr(fused, "MIN_FUSED_ELEMENTS", 65536)  # the real threshold, as in training
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    apply_plan(model, plan_quantization(model, 4))
    batches = [(torch.randn(8, 3, 64, 64),) for _ in range(4)]
    torch._dynamo.utils.counters.clear()
    assert calibrate_for_training(model, batches, lambda batch, i: model(batch[0]), 4) == 4
    assert not fused._failed and "errors" in fused._compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_a_failing_kernel_leaves_the_others_fused(monkeypatch, caplog):
    compile_kernel = fused._kernel

    def errors_fail(name):
        if name == "errors":
            raise RuntimeError("past the recompile limit")
        return compile_kernel(name)

    monkeypatch.setattr(fused, "_kernel", errors_fail)
    sample, scale = torch.randn(1, 500), torch.full((1, 3), 0.1)
    with caplog.at_level(logging.WARNING, logger="qat_lightning.quant.fused"):
        errors = fused.candidate_errors(sample, scale, torch.zeros(1, 3), 0, 15)
    torch.testing.assert_close(errors, error.candidate_errors(sample, scale, torch.zeros(1, 3), 0, 15))
    assert fused._failed == {"errors"} and "unavailable for errors (past the recompile limit)" in caplog.text
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    fused.fake_quantize_lsq(x, torch.tensor(0.1), torch.tensor(0.0), 0, 15, 1.0).sum().backward()
    assert "lsq" in fused._compiled and fused._failed == {"errors"}  # the LSQ kernel compiled and ran
