"""Output roundings: the residual-add operands and pool inputs that int8 runtimes quantize are rounded in QAT too."""

from __future__ import annotations

import copy

import lightning as L
import onnx
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from qat_lightning import QuantizationCallback, convert_model
from qat_lightning.convert.backends import backend
from qat_lightning.convert.readout import integer_model
from qat_lightning.nn import (
    apply_plan,
    find_input_producers,
    find_output_roundings,
    freeze_batchnorm_stats,
    output_roundings,
    plan_quantization,
    prepare_for_state_dict,
    restore_float,
    round_outputs,
    share_input_quantizers,
)
from qat_lightning.nn.input_sharing import RoundsOutput
from tests.random_data_module import RandomDataClassifier


class DownNet(nn.Module):
    """A stem, one ResNet block whose shortcut is a strided 1x1 conv + BatchNorm, a global average pool, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def _shared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    apply_plan(model, plan_quantization(model, 8))
    share_input_quantizers(model, find_input_producers(model, (x,)))
    return model


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    freeze_batchnorm_stats(model)
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.1 * torch.randn_like(x))
    return model.eval()


def _round(model: nn.Module, x: torch.Tensor) -> nn.Module:
    _shared(model, x)
    round_outputs(model, find_output_roundings(model, (x,)))
    return model


def _rounded(x: torch.Tensor) -> nn.Module:
    return _calibrated(_round(DownNet(), x), x)


def test_finds_the_downsample_operand_and_the_pool_input():
    x = torch.randn(2, 3, 8, 8)
    assert find_output_roundings(_shared(DownNet(), x), (x,)) == ["block.downsample.1", "block"]
    resnet = _shared(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    found = find_output_roundings(resnet, (torch.randn(1, 3, 32, 32),))
    assert found == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)] + ["layer4.1"]


class _Rules(nn.Module):
    """Adds whose operands must not be rounded: one also read by a multiply, one already rounded (a conv input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.b(x))
        z = self.a(x) + y
        z = z * y  # ``y`` is read twice: rounding it would change the multiply too
        return z + self.c(z)  # ``z`` is made by no module, ``self.c(z)`` by a fake-quantized layer


def test_operands_read_elsewhere_or_already_rounded_are_left_alone():
    x = torch.randn(2, 3, 4, 4)
    assert find_output_roundings(_shared(_Rules(), x), (x,)) == []
    resnet = _shared(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    found = find_output_roundings(resnet, (torch.randn(1, 3, 32, 32),))
    assert not any(name.startswith("layer1") for name in found)  # identity shortcuts read a rounded block input


def test_rounded_output_is_on_its_grid_and_observes_with_frozen_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = _rounded(x)
    quantizer = output_roundings(model)["block.downsample.1"]
    assert quantizer.calibrated and quantizer.config.bits == 8  # it observed although its BatchNorm is in eval mode
    assert model.block.downsample[1].output_quantizer is quantizer
    seen = {}
    model.block.downsample[0].register_forward_hook(lambda m, i, out: seen.setdefault("conv", out))
    model.block.downsample[1].register_forward_hook(lambda m, i, out: seen.setdefault("bn", out))
    model(x)
    bn = model.block.downsample[1]
    float_bn = F.batch_norm(seen["conv"], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    scale, zero_point = float(quantizer.scale), int(quantizer.zero_point)
    expected = torch.fake_quantize_per_tensor_affine(float_bn, scale, zero_point, 0, 255)
    torch.testing.assert_close(seen["bn"], expected, rtol=0, atol=1e-6)
    assert len(seen["bn"].unique()) > 20  # a real grid, not a collapsed one


def test_checkpoint_rebuilds_the_roundings_and_restore_float_removes_them():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    reference = DownNet().eval()
    model = _calibrated(_round(copy.deepcopy(reference), x), x)
    state = model.state_dict()
    assert "output_quantizers.block/downsample/1.scale" in state
    fresh = copy.deepcopy(reference)
    assert prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    assert sorted(output_roundings(fresh)) == ["block", "block.downsample.1"]
    assert torch.equal(fresh.eval()(x), model(x))
    restore_float(model)
    assert not any(isinstance(m, RoundsOutput) for m in model.modules()) and not output_roundings(model)
    assert "output_quantizers" not in dict(model.named_children())
    assert torch.equal(model.eval()(x), reference(x))


def test_files_round_where_qat_rounds(tmp_path, monkeypatch):
    # ExecuTorch on float kernels only: its int8 ones round biases to int32 (tests/test_backends.py), which would
    # hide whether the rounding points are where QAT put them.
    monkeypatch.setattr(backend("executorch"), "INT8_RELATIVE_ERROR", 0.0)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = _rounded(x)
    formats = ("pt2", "onnx") + (("executorch",) if backend("executorch").requirement() is None else ())
    checks = [((torch.randn(16, 3, 8, 8),), None)]
    result = convert_model(model, (x,), tmp_path, formats=formats, check_batches=checks)
    assert not result.failed
    assert result.fidelity["pt2"].relative_error == 0.0  # the .pt2 program computes exactly what QAT computed
    integer = integer_model(model)
    assert sorted(integer.output_grids) == ["block", "block.downsample.1"]
    folded = integer.folded((x,))  # the folded BatchNorm leaves its rounding behind (x86, ExecuTorch)
    assert isinstance(folded.model.block.downsample[1], RoundsOutput)
    graph = onnx.load(result.paths["onnx"]).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    quantized = {made_by.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "BatchNormalization" in quantized  # the shortcut's BatchNorm output, read by the add
    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    assert pools and all(made_by[n.input[0]] == "DequantizeLinear" for n in pools)
    expected = model(x)
    torch.testing.assert_close(backend("onnx").load(result.paths["onnx"])(x), expected, rtol=0, atol=1e-5)
    if "executorch" in formats:  # rounded without torch.round there: the same numbers, on float kernels
        assert result.fidelity["executorch"].relative_error < 1e-3


def _classifier() -> RandomDataClassifier:
    return RandomDataClassifier(DownNet(), side=8)


def test_callback_rounds_outputs_and_resumes(trainer_kwargs, tmp_path):
    module = _classifier()
    callback = QuantizationCallback(bits=8, warmup_epochs=1, convert_on_fit_end=False, learned_scale=True)
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs)
    trainer.fit(module)
    rounded = output_roundings(module)
    assert sorted(rounded) == ["net.block", "net.block.downsample.1"]
    assert all(q.calibrated and q.config.learned_scale for q in rounded.values())  # LSQ, as the layer inputs
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    resumed = _classifier()
    callback = QuantizationCallback(bits=8, warmup_epochs=1, learned_scale=True, convert_on_fit_end=False)
    trainer = L.Trainer(max_epochs=3, callbacks=[callback], **trainer_kwargs)
    trainer.fit(resumed, ckpt_path=path)  # the optimizer state (learned scales group) must line up
    assert sorted(output_roundings(resumed)) == ["net.block", "net.block.downsample.1"]
    assert resumed.net.block.output_quantizer is output_roundings(resumed)["net.block"]
