"""Every script in ``examples/`` runs (``--fast``) and does what it says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from qat_lightning import FakeQuantizedLayer, SmallCNN, fake_quantized_layers
from qat_lightning.nn import quantizers
from qat_lightning.nn.input_sharing import RoundsOutput

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def levels_per_channel(layer: FakeQuantizedLayer) -> int:
    """Most distinct values of the forward-pass weight in any output channel."""
    return max(len(row.unique()) for row in layer.quantized_weight().flatten(1))


def test_every_example_has_a_test():
    tested = {"plain_python", "custom_model", "ptq_vs_qat", "weight_norm_study"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def check_every_layer_trained_at_4_bits(result: dict, output: str) -> None:
    """Every conv/linear layer is fake-quantized and its weights lie on its grid: 4 bits, except the first
    and last layers, which the callback keeps at 8 bits by default."""
    model, callback = result["model"], result["callback"]
    assert callback.phase != "fp32" and callback.fp32_score is not None and callback.quantized_score is not None
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    quantized = [layer for _, layer in fake_quantized_layers(model)]
    assert quantized == layers
    bits = [layer.weight_quantizer.config.bits for layer in quantized]
    assert bits == [8] + [4] * (len(layers) - 2) + [8]
    assert all(levels_per_channel(layer) <= 2**b for layer, b in zip(quantized, bits, strict=True))
    assert "4-bit QAT" in output


def test_plain_python_example_trains_its_own_module_at_4_bits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = load_example("plain_python").main(["--fast"])
    check_every_layer_trained_at_4_bits(result, capsys.readouterr().out)


def test_custom_model_example_quantizes_depthwise_convolutions_per_channel(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = load_example("custom_model").main(["--fast"])
    check_every_layer_trained_at_4_bits(result, capsys.readouterr().out)
    model = result["model"]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(isinstance(m, FakeQuantizedLayer) for m in depthwise)
    assert all(m.weight_quantizer.scale.shape == (m.out_channels,) for m in depthwise)
    model.eval()
    features = model.backbone.stem(torch.randn(2, 1, 8, 8))
    block = model.backbone.blocks[0]
    # The residual add is kept; its output feeds the next block's conv and skip branch, so it is rounded once,
    # where it is made, by that conv's input quantizer (input sharing).
    assert (
        isinstance(block, RoundsOutput) and block.output_quantizer is model.backbone.blocks[1].block[0].input_quantizer
    )
    torch.testing.assert_close(block(features), block.output_quantizer(features + block.block(features)))


def test_ptq_vs_qat_calibrates_and_reports_each_bit_width(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    example = load_example("ptq_vs_qat")
    results = example.main(["--fast", "--bits", "8", "2"])

    assert set(results["bits"]) == {8, 2}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["float"] == results["float"]
    assert abs(results["bits"][8]["ptq"] - results["float"]) <= 0.02  # 8-bit PTQ changes almost nothing

    # The calibration touches observers only: BatchNorm statistics stay, every quantizer has a range; the
    # output error grows as the bit width of the middle layer drops.
    float_model = SmallCNN(input_size=8).eval()
    data = example.DigitsDataModule()
    data.setup()
    x = next(iter(data.test_dataloader()))[0]
    errors = {}
    for bits in (8, 2):
        ptq = example.post_training_quantize(float_model, bits, data.train_dataloader(), batches=2)
        assert all(q.calibrated for q in quantizers(ptq)) and not ptq.training
        torch.testing.assert_close(ptq.features[1].running_mean, float_model.features[1].running_mean)
        assert levels_per_channel(ptq.features[4]) <= 2**bits
        with torch.no_grad():
            errors[bits] = float((ptq(x) - float_model(x)).pow(2).mean())
    assert errors[8] < errors[2] / 10


def test_weight_norm_study_prints_its_table(monkeypatch, capsys):
    study = load_example("weight_norm_study")
    monkeypatch.setattr("sys.argv", ["weight_norm_study.py", "--seeds", "1", "--epochs", "1"])
    study.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert [line.split("|")[2].strip() for line in lines] == ["no", "yes"]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")[2:]]
        accuracies = [float(c.split(" ± ")[0]) for c in cells[:-1]]
        assert all(0.0 <= a <= 100.0 for a in accuracies) and accuracies[0] > 10.0  # above chance after an epoch
        assert float(cells[-1]) > 0.0  # the largest weight magnitude
