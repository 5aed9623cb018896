"""Shared input quantizers: a tensor read by a quantized layer and by other ops is rounded once, where it is made."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qat_lightning import QuantizationCallback, convert_model
from qat_lightning.convert.backends import backend
from qat_lightning.nn import (
    FakeQuantizedLayer,
    apply_plan,
    find_input_producers,
    format_plan,
    plan_from_state_dict,
    plan_quantization,
    prepare_for_state_dict,
    restore_float,
    share_input_quantizers,
    unshare_input_quantizers,
)
from qat_lightning.nn.input_sharing import RoundsOutput
from tests.random_data_module import RandomDataClassifier


class Block(nn.Module):
    """A pre-activation residual block: ``relu(x + conv(x))``, its input read by the conv and by the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv(x))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def _prepared(
    model: nn.Module, x: torch.Tensor, bits: int = 8, share: bool = True, activation_bits: int | None = None
) -> nn.Module:
    apply_plan(model, plan_quantization(model, bits, activation_bits))
    if share:
        share_input_quantizers(model, find_input_producers(model, (x,)))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.1 * torch.randn_like(x))
    return model.eval()


def test_producers_of_torchvision_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    producers = find_input_producers(model, (torch.randn(2, 3, 32, 32),))
    # A stage's output feeds the next stage's first conv and its downsample shortcut; the outermost module wins.
    assert producers["layer2.0.conv1"] == producers["layer2.0.downsample.0"] == "layer1"
    assert producers["layer1.1.conv1"] == "layer1.0"
    assert producers["layer1.0.conv1"] == "maxpool"
    # Not module outputs: the model input, and the ReLU reused twice inside each block.
    assert "conv1" not in producers and "layer1.0.conv2" not in producers
    assert "fc" not in producers  # torch.flatten is a functional op


def test_producer_rules_dropout_reuse_and_in_place():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))
            self.drop = nn.Dropout(0.3)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(self.act(self.a(x)))  # Dropout returns its input as is in eval mode only
            g = self.act(self.b(h))  # self.act runs twice: not a producer
            k = self.c(g)
            k.add_(1.0)  # changed in place after self.c returned it
            return self.d(k) + self.d(h)  # self.d runs twice: left out

    producers = find_input_producers(Net(), (torch.randn(3, 4),))
    assert producers == {"b": "drop"}


def test_shared_block_input_is_rounded_once_for_conv_and_add():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    model = _prepared(ResidualNet(), x)
    conv = model.block2.conv
    quantizer = conv.input_quantizer
    assert quantizer.producer == "block1" and isinstance(model.block1, RoundsOutput)
    assert model.block1.output_quantizer is quantizer
    # Independent computation of block2: both the conv and the add read fq(block1 output).
    with torch.no_grad():
        h = model.block1.float_class.forward(model.block1, model.stem(x))
        s, zp = float(quantizer.scale), int(quantizer.zero_point)
        qmin, qmax = 0, 2**quantizer.config.bits - 1
        rounded = (torch.clamp(torch.round(h * (1 / s)) + zp, qmin, qmax) - zp) * s
        weight = conv.quantized_weight()
        expected = F.relu(rounded + F.conv2d(rounded, weight, conv.bias, padding=1))
        # Hook block2's output to compare with the model's own pass.
        seen = {}
        handle = model.block2.register_forward_hook(lambda m, i, o: seen.update(out=o))
        model(x)
        handle.remove()
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-6)
    assert len(torch.unique(torch.round(rounded / s))) > 10  # the tensor really is on a grid of many levels


def test_layers_reading_one_producer_share_one_quantizer_and_one_state_dict_entry():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    apply_plan(model, plan_quantization(model, 8))
    shared = share_input_quantizers(model, find_input_producers(model, (x,)))
    assert shared["layer2.0.conv1"] == shared["layer2.0.downsample.0"] == "layer1"
    assert model.layer2[0].conv1.input_quantizer is model.layer2[0].downsample[0].input_quantizer
    # The producer holds the quantizer by reference: it is saved under its readers' names only.
    assert not any(k.startswith("layer1.output_quantizer") for k in model.state_dict())
    assert "layer1" not in {n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith("_quantizer")}


def test_a_slice_of_a_rounding_sequential_runs_unrounded():
    x = torch.randn(2, 3, 4, 4)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Conv2d(4, 2, 1))
    apply_plan(net, plan_quantization(net, 8))
    assert share_input_quantizers(net, find_input_producers(net, (x,))) == {"1": "0"}
    stem = net.eval()[0]
    assert isinstance(stem, RoundsOutput)
    torch.testing.assert_close(stem[:2](x), F.relu(stem[0](x)))  # a slice is built by the class: plain, unrounded


def test_different_input_configs_are_not_shared():
    model = torchvision.models.resnet18(num_classes=10)
    apply_plan(model, plan_quantization(model, 4, layer_bits={"layer2.0.downsample.0": 8}))
    shared = share_input_quantizers(model, find_input_producers(model, (torch.randn(2, 3, 32, 32),)))
    assert "layer2.0.conv1" not in shared and "layer2.0.downsample.0" not in shared
    assert shared["layer1.1.conv1"] == "layer1.0"


def test_checkpoint_rebuilds_sharing_and_outputs():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    model = _prepared(ResidualNet(), x, bits=4)
    state = model.state_dict()
    plan = plan_from_state_dict(state)
    assert {p.name: p.input_from for p in plan if p.input_from} == {
        "block1.conv": "stem",
        "block2.conv": "block1",
        "fc": "drop",
    }
    assert "@ block1" in format_plan(plan)
    fresh = ResidualNet()
    assert prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert fresh.block2.conv.input_quantizer.producer == "block1"


def test_loading_a_shared_checkpoint_into_an_unshared_model_names_the_fix():
    x = torch.randn(4, 3, 6, 6)
    state = _prepared(ResidualNet(), x).state_dict()
    plain = ResidualNet()
    apply_plan(plain, plan_quantization(plain, 8))
    with pytest.raises(ValueError, match="prepare_for_state_dict"):
        plain.load_state_dict(state)


def test_unshare_and_restore_float_give_the_model_back():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    reference = ResidualNet().eval()
    model = copy.deepcopy(reference)
    _prepared(model, x)
    unshare_input_quantizers(model)
    assert not any(isinstance(m, RoundsOutput) for m in model.modules())
    assert model.block2.conv.input_quantizer.producer is None
    restore_float(model)
    assert type(model.block1) is Block and not any(isinstance(m, FakeQuantizedLayer) for m in model.modules())
    assert torch.equal(model.eval()(x), reference(x))


def test_conversion_rounds_the_residual_branch_like_qat(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 6)
    model = _prepared(ResidualNet(), x)
    checks = [((torch.randn(16, 3, 6, 6),), None)]
    result = convert_model(model, (x,), tmp_path, formats=("pt2", "onnx"), check_batches=checks)
    assert not result.failed
    assert result.fidelity["pt2"].relative_error == 0.0  # the .pt2 program computes exactly what QAT computed
    assert result.fidelity["onnx"].agreement == 1.0 and result.fidelity["onnx"].relative_error < 1e-5
    graph = onnx.load(result.paths["onnx"]).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    residual_adds = [n for n in graph.node if n.op_type == "Add" and all(i in made_by for i in n.input)]
    assert residual_adds and all("DequantizeLinear" in {made_by[i] for i in n.input} for n in residual_adds)
    onnx_out = backend("onnx").load(result.paths["onnx"])(x)
    torch.testing.assert_close(onnx_out, model(x), rtol=0, atol=1e-5)


def test_seven_bit_grid_after_relu_keeps_unsigned_codes_behind_its_clip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 6)
    model = ResidualNet()
    _prepared(model, x, bits=8, activation_bits=7)  # torch.ao's x86 default (reduce_range)
    assert model.block2.conv.input_quantizer.config.bits == 7
    result = convert_model(model, (x,), tmp_path, formats=("pt2", "onnx"))
    graph = onnx.load(result.paths["onnx"]).graph
    made_by = {out: n for n in graph.node for out in n.output}
    quantizes = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in made_by]
    after_clip = [n for n in quantizes if made_by[n.input[0]].op_type == "Clip"]
    assert len(after_clip) >= 2  # unsigned codes below 128: what oneDNN's AVX2 kernels add without saturating
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    assert all(initializers[n.input[2]].dtype == np.uint8 for n in quantizes)
    pt2 = backend("pt2").load(result.paths["pt2"])(x)
    torch.testing.assert_close(backend("onnx").load(result.paths["onnx"])(x), pt2, rtol=0, atol=1e-5)


def _classifier() -> RandomDataClassifier:
    return RandomDataClassifier(ResidualNet(), side=6)


def test_callback_shares_inputs_traced_on_the_warmup_steps_and_resumes(trainer_kwargs, tmp_path):
    module = _classifier()
    callback = QuantizationCallback(bits=4, warmup_epochs=1, convert_on_fit_end=False)
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs)
    trainer.fit(module)
    assert {p.name: p.input_from for p in callback.plan if p.input_from} == {
        "net.block1.conv": "net.stem",
        "net.block2.conv": "net.block1",
        "net.fc": "net.drop",
    }
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    resumed = _classifier()
    trainer = L.Trainer(max_epochs=3, callbacks=[QuantizationCallback(bits=4, warmup_epochs=1)], **trainer_kwargs)
    trainer.fit(resumed, ckpt_path=path)  # the optimizer state (learned scales group) must line up
    assert resumed.net.block2.conv.input_quantizer.producer == "net.block1"
    assert resumed.net.block1.output_quantizer is resumed.net.block2.conv.input_quantizer


def test_callback_without_any_call_before_quantizing_keeps_layer_inputs(trainer_kwargs, lightning_caplog):
    module = _classifier()
    callback = QuantizationCallback(bits=4, warmup_epochs=0, convert_on_fit_end=False)
    L.Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs).fit(module)  # no sanity check, no warmup
    assert not any(p.input_from for p in callback.plan)
    assert "set `example_input_array`" in lightning_caplog.text
    module = _classifier()
    module.example_input_array = torch.randn(2, 3, 6, 6)
    callback = QuantizationCallback(bits=4, warmup_epochs=0, convert_on_fit_end=False)
    L.Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs).fit(module)
    assert sum(p.input_from is not None for p in callback.plan) == 3
