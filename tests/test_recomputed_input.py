"""Convolutions that recompute their rounded input in the backward pass: the plain path's numbers, less memory."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn import apply_plan, find_input_producers, plan_quantization, share_input_quantizers
from qat_lightning.nn.convolution_types import CONV_TYPES
from qat_lightning.quant import FakeQuantizer, rounding, set_recompute


@pytest.fixture(autouse=True)
def _recompute_small_tensors(monkeypatch):
    """Recompute whatever the size (the real threshold skips tensors this small); recomputing on afterwards."""
    monkeypatch.setattr(rounding, "MIN_RECOMPUTED_ELEMENTS", 0)
    yield
    set_recompute(True)


class ReluConv(nn.Module):
    """``layer(relu(x))``: the ReLU output is what the layer's input quantizer rounds."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.relu(x))


class Fork(nn.Module):
    """A producer read by two convolutions and an add (its rounding is shared at its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return (self.a(y) + y).mean() + self.b(y).square().mean()


def _quantized(model: nn.Module, x: torch.Tensor, learned_scale: bool, shared: bool = False) -> nn.Module:
    apply_plan(model, plan_quantization(model, 4, first_last_bits=None, learned_scale=learned_scale))
    if shared:
        share_input_quantizers(model, find_input_producers(model, (x,)))
    model.train()
    with torch.no_grad():
        model(x)  # observe, and start the learned scales
    return model


def _step(model: nn.Module, x: torch.Tensor, recompute: bool) -> tuple[torch.Tensor, torch.Tensor, list, set[str]]:
    """Output, input gradient, parameter gradients and the kinds of the layers' backward nodes of one step."""
    set_recompute(recompute)
    x = x.clone().requires_grad_(True)
    nodes: set[str] = set()

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nodes.add(type(out.grad_fn).__name__)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, CONV_TYPES)]
    out = model(x)
    for hook in hooks:
        hook.remove()
    out.backward(torch.ones_like(out) if out.dim() else None)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads, nodes


LAYERS = {
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), (4, 6, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 4, 5, padding=2, dilation=2, bias=False), (4, 6, 20)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), (4, 6, 7, 7)),
}


@pytest.mark.parametrize("learned_scale", [True, False])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_values_and_gradients_equal_the_plain_layer(kind, learned_scale):
    make, shape = LAYERS[kind]
    x = torch.randn(shape)
    model = _quantized(ReluConv(make()), x, learned_scale)
    out, x_grad, grads, nodes = _step(model, x, recompute=True)
    ref_out, ref_x_grad, ref_grads, ref_nodes = _step(model, x, recompute=False)
    assert nodes == {"_RecomputedInputConvolutionBackward"}
    assert ref_nodes in ({"ConvolutionBackward0"}, {"ConvolutionBackward1"})
    assert torch.equal(out, ref_out)
    assert torch.equal(x_grad, ref_x_grad)
    assert len(grads) == len(ref_grads) == len(list(model.parameters()))
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(grad, ref)


def test_input_gradient_is_torch_fake_quant_then_conv():
    """Independently of our code's plain path: torch's fake-quant kernel, then ``F.conv2d`` on the rounded weight."""
    x = torch.randn(4, 6, 9, 9)
    model = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1)), x, learned_scale=False)
    set_recompute(True)
    ours_x = x.clone().requires_grad_(True)
    out = model(ours_x)
    out.backward(torch.cos(out.detach()))
    layer, q = model.layer, model.layer.input_quantizer
    ref_x = x.clone().requires_grad_(True)
    rounded = torch.fake_quantize_per_tensor_affine(torch.relu(ref_x), q.scale, q.zero_point, 0, 15)
    ref = F.conv2d(rounded, layer.quantized_weight().detach(), layer.bias.detach(), padding=1)
    ref.backward(torch.cos(ref.detach()))
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert (ref_x.grad == 0).any() and (ref_x.grad != 0).any()


@pytest.mark.parametrize("learned_scale", [True, False])
def test_shared_input_is_recomputed_with_the_plain_numbers(learned_scale):
    x = torch.randn(2, 3, 12, 12)
    model = _quantized(Fork(), x, learned_scale, shared=True)
    assert model.a.input_quantizer is model.b.input_quantizer and model.a.input_quantizer.producer == "stem"
    out, x_grad, grads, nodes = _step(model, x, recompute=True)
    ref_out, ref_x_grad, ref_grads, ref_nodes = _step(model, x, recompute=False)
    assert nodes == {"_RecomputedInputConvolutionBackward"}
    assert ref_nodes == {"ConvolutionBackward0"}
    assert torch.equal(out, ref_out) and torch.equal(x_grad, ref_x_grad)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(grad, ref)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of ``model(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x.clone().requires_grad_(True))
    out.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("learned_scale", [True, False])
def test_saved_activations_are_those_of_the_float_layer(learned_scale):
    x = torch.randn(8, 16, 16, 16)
    activation = x.numel() * 4
    float_model = ReluConv(nn.Conv2d(16, 16, 3, padding=1))
    model = _quantized(copy.deepcopy(float_model), x, learned_scale)
    float_bytes = _saved_bytes(float_model, x)  # the ReLU output (read by the ReLU and the conv) and the weight
    set_recompute(False)
    kept = _saved_bytes(model, x)
    set_recompute(True)
    recomputed = _saved_bytes(model, x)
    assert float_bytes >= activation
    assert kept - float_bytes >= activation  # the rounded copy
    weight = float_model.layer.weight.numel() * 4
    assert recomputed - float_bytes <= weight + 1024  # the rounded weight (its own tensor) and the grids only


@pytest.mark.parametrize("learned_scale", [True, False])
def test_under_autocast_as_autocast_computes_the_plain_layer(learned_scale):
    """CPU autocast (bfloat16) stands for CUDA's: the layer casts what autocast would and keeps the numbers."""
    x = torch.randn(4, 6, 9, 9)
    model = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1)), x, learned_scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x_grad, grads, nodes = _step(model, x, recompute=True)
        ref_out, ref_x_grad, ref_grads, ref_nodes = _step(model, x, recompute=False)
    assert nodes == {"_RecomputedInputConvolutionBackward"} and ref_nodes == {"ConvolutionBackward0"}
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert torch.equal(out, ref_out) and torch.equal(x_grad, ref_x_grad)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(grad, ref)


def test_other_calls_take_the_plain_convolution():
    x = torch.randn(4, 6, 9, 9)
    reflect = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect")), x, True)
    assert _step(reflect, x, recompute=True)[3] == {"ConvolutionBackward0"}
    plain = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1)), x, True)
    with torch.no_grad():
        assert plain(x).grad_fn is None
    assert _step(plain, x[0], recompute=True)[3] == {"SqueezeBackward1"}  # unbatched: the plain conv2d


def test_a_model_that_ran_copies_and_pickles():
    x = torch.randn(4, 6, 9, 9)
    model = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1)), x, True)
    out = model(x.requires_grad_(True))  # the quantizer now holds weak references to its input and output
    quantizer = model.layer.input_quantizer
    assert isinstance(quantizer, FakeQuantizer) and quantizer.rounding_of(out) is None
    assert quantizer.rounding_of(torch.relu(x)) is None  # equal values, another tensor
    copied = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for other in (copied, loaded):
        assert torch.equal(other(x.detach()), out.detach())


def test_source_changed_in_place_fails_as_in_the_plain_path():
    x = torch.randn(4, 6, 9, 9)
    model = _quantized(ReluConv(nn.Conv2d(6, 8, 3, padding=1)), x, learned_scale=False)
    for recompute in (True, False):
        set_recompute(recompute)
        source = torch.relu(x.clone().requires_grad_(True) * 1.0)
        out = model.layer(source)
        source.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
