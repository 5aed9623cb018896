"""The optional backends: what each writes, that it runs what was trained, and that it fails with a clear reason."""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from qat_lightning import convert_model
from qat_lightning.convert import BACKENDS, DEFAULT_FORMATS
from qat_lightning.convert.backends import backend, check_formats
from qat_lightning.convert.fidelity import relative_error
from qat_lightning.convert.readout import integer_model
from qat_lightning.convert.reference import ReferenceSource
from qat_lightning.nn import apply_plan, find_input_producers, plan_quantization, share_input_quantizers


def _calibrated(
    model: nn.Module, input_shape: tuple[int, ...], bits: int = 8, share: bool = False, reduce_range: bool = False
) -> nn.Module:
    """``model`` fake-quantized at ``bits`` (first/last at 8), its observers run on 3 random batches of 16; with
    ``share``, inputs are rounded where they are made, as ``QuantizationCallback`` does."""
    apply_plan(model, plan_quantization(model, bits, first_last_bits=8, reduce_range=reduce_range))
    if share:
        share_input_quantizers(model, find_input_producers(model, (torch.randn(2, *input_shape),)))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *input_shape))
    return model.eval()


def _rgb_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_formats_are_checked_by_name_and_dependency() -> None:
    assert set(DEFAULT_FORMATS) <= set(BACKENDS)
    assert check_formats(["pt2"]) == ("pt2",) and check_formats("onnx") == ("onnx",)
    with pytest.raises(ValueError, match=r"Unknown format 'tflite'; `formats` takes any of \('pt2', 'onnx'"):
        check_formats(("pt2", "tflite"))


def test_x86_version_gate_names_the_supported_torch(monkeypatch) -> None:
    x86 = backend("x86")
    monkeypatch.setattr(x86, "_torch_version", lambda: (2, 99))
    assert "torch 2.6 to 2.14 (this is" in x86.requirement()
    with pytest.raises(ValueError, match="Format 'x86' needs packages that are not installed: torch 2.6 to 2.14"):
        check_formats(("x86",))


x86_available = pytest.mark.skipif(backend("x86").requirement() is not None, reason="no C++ compiler / torch")


@x86_available
def test_x86_package_calls_onednn_int8_kernels_and_follows_the_model(tmp_path) -> None:
    """Fails loudly if a torch release stops fusing the reference program into oneDNN int8 kernels. (7-bit inputs:
    exact on every x86 CPU; on AVX2-only ones 8-bit inputs saturate, see the next tests.)"""
    model = _calibrated(_rgb_cnn(), (3, 16, 16), reduce_range=True)
    batches = [((torch.randn(8, 3, 16, 16),), None) for _ in range(3)]
    result = convert_model(model, batches[0][0], tmp_path, formats=("x86",), packed=False, check_batches=batches)

    assert result.failed == {}
    fidelity = result.fidelity["x86"]
    assert fidelity.agreement == 1.0 and fidelity.relative_error < 0.01, fidelity
    wrappers = [n for n in zipfile.ZipFile(result.paths["x86"]).namelist() if n.endswith("wrapper.cpp")]
    code = zipfile.ZipFile(result.paths["x86"]).read(wrappers[0]).decode()
    assert code.count("qconv_pointwise") >= 2 and "qlinear_pointwise" in code  # int8 kernels, not float convs
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.save({"x": x, "expected": model(x)}, tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['qat_lightning'] = None; sys.modules['torchao'] = None\n"
        "import torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"model = torch._inductor.aoti_load_package({str(result.paths['x86'])!r})\n"
        "print(float((model(io['x']) - io['expected']).norm() / io['expected'].norm()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 0.01


@x86_available
def test_x86_package_that_computes_something_else_is_refused_and_the_other_files_written(tmp_path) -> None:
    """oneDNN's fused int8 convolution goes wrong on a single input channel: the backend notices and says so."""
    torch.manual_seed(0)
    model = _calibrated(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)), (1, 16, 16))
    with pytest.warns(UserWarning, match="the 'x86' file could not be written"):
        result = convert_model(model, (torch.randn(8, 1, 16, 16),), tmp_path, formats=("pt2", "x86"), packed=False)
    assert "single input channel" in result.failed["x86"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversion_report.json", "model_int8.pt2"]


def test_x86_refusal_of_a_model_on_8_bit_inputs_names_reduce_range() -> None:
    x = torch.randn(8, 3, 16, 16)
    x86 = backend("x86")
    eight_bit = ReferenceSource(integer_model(_calibrated(_rgb_cnn(), (3, 16, 16))), (x,))
    assert "8-bit inputs: train with `reduce_range=True`" in x86.mismatch_cause(eight_bit)
    seven_bit = ReferenceSource(integer_model(_calibrated(_rgb_cnn(), (3, 16, 16), reduce_range=True)), (x,))
    assert "reduce_range" not in x86.mismatch_cause(seven_bit)
    assert "requantize in their own float order" in x86.mismatch_cause(seven_bit)


@x86_available
def test_x86_package_on_an_avx2_cpu_follows_7_bit_inputs_and_names_reduce_range_for_8_bit_ones(tmp_path) -> None:
    """oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA``, read when oneDNN starts: a fresh process) adds 8-bit products
    in 16 bits: with 7-bit inputs (``reduce_range=True``) the package follows the program; with 8-bit ones it may
    saturate (on some inputs only), and then the refusal names the fix."""
    for name, reduce_range in (("seven", True), ("eight", False)):
        torch.save(_calibrated(_rgb_cnn(), (3, 16, 16), reduce_range=reduce_range), tmp_path / f"{name}.pt")
    script = (
        "import torch\n"
        "from qat_lightning import convert_model\n"
        "outcomes = {}\n"
        "for name in ('seven', 'eight'):\n"
        f"    model = torch.load({str(tmp_path)!r} + f'/{{name}}.pt', weights_only=False)\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(8, 3, 16, 16)\n"
        f"    result = convert_model(model, (x,), {str(tmp_path)!r} + f'/{{name}}', formats=('x86',), packed=False)\n"
        "    outcomes[name] = result.failed.get('x86', 'written')\n"
        "print(repr(outcomes))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert outcomes["seven"] == "written", outcomes
    assert outcomes["eight"] == "written" or "train with `reduce_range=True`" in outcomes["eight"], outcomes


executorch_available = pytest.mark.skipif(
    backend("executorch").requirement() is not None, reason="executorch is not installed"
)


def _executorch_file_follows_the_model(model: nn.Module, shape: tuple[int, ...], tmp_path) -> dict[str, object]:
    # A random network has near-tied logits on some inputs, where float rounding alone can swap the top two (ONNX
    # Runtime's too): agreement is checked on the inputs it separates most clearly of 64, the error on all of them.
    x = torch.randn(64, *shape)
    with torch.no_grad():
        top = model(x).topk(2, dim=1).values
    clear = x[(top[:, 0] - top[:, 1]).argsort(descending=True)[:24]]
    batches = [((part,), None) for part in clear.split(8)]
    result = convert_model(model, batches[0][0], tmp_path, formats=("executorch",), packed=False, check_batches=batches)

    assert result.failed == {} and result.paths["executorch"].name == "model_int8.pte"
    fidelity = result.fidelity["executorch"]
    assert fidelity.agreement == 1.0 and fidelity.relative_error < 0.01, fidelity
    run = backend("executorch").load(result.paths["executorch"])
    with torch.no_grad():
        expected = model(x)
    assert relative_error(run(x), expected) < 0.01  # the full 64, past the example batch of 8
    for batch in (1, 8):
        with torch.no_grad():
            expected = model(x[:batch])
        assert relative_error(run(x[:batch]), expected) < 0.01, batch
    return {"bytes": result.sizes[result.paths["executorch"]]}


@executorch_available
def test_executorch_file_of_resnet20_follows_the_model_at_any_batch(tmp_path, caplog) -> None:
    from qat_lightning.models import resnet20

    torch.manual_seed(0)
    model = _calibrated(resnet20(), (3, 32, 32), share=True)
    with caplog.at_level("INFO", logger="qat_lightning.convert.backends.executorch"):
        _executorch_file_follows_the_model(model, (3, 32, 32), tmp_path)
    # XNNPACK rounds an int8 layer's bias to input scale * weight scale: on this chaotic random network that alone
    # moves the logits by about 1 % for most layers, which then run as float kernels on their trained grids. Only a
    # layer whose output QAT rounds (the stem, the first convolution of a block) may run on int8, never one feeding
    # a residual add or the logits.
    int8 = _int8_layers(caplog.text)
    assert "XNNPACK cannot lower" not in caplog.text
    assert set(int8) <= {"conv1"} | {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}, int8


def _int8_layers(log: str) -> list[str]:
    """The layers the executorch backend's log says run on XNNPACK's int8 kernels."""
    (listed,) = re.findall(r"XNNPACK int8 layers (\[.*?\]), the others float", log)
    return ast.literal_eval(listed)


def _tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        BasicBlock(8, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


RESIDUAL_INT8 = ["0", "3.conv1", "4.conv1"]  # the stem and each block's first convolution: QAT rounds their output


@executorch_available
def test_executorch_file_of_a_residual_net_runs_only_convolutions_whose_output_qat_rounds_on_int8(
    tmp_path, caplog
) -> None:
    """Each block's input is rounded once where it is made and read by the block's first convolution (int8) and
    by the residual add (float); of those candidates, the ones whose bias rounding the output tolerates run on
    int8 (that they compute on int8 is checked by the next test)."""
    model = _calibrated(_tiny_resnet(), (3, 16, 16), share=True)
    with caplog.at_level("INFO", logger="qat_lightning.convert.backends.executorch"):
        _executorch_file_follows_the_model(model, (3, 16, 16), tmp_path)
    int8 = _int8_layers(caplog.text)
    assert int8 and set(int8) <= set(RESIDUAL_INT8) and "XNNPACK cannot lower" not in caplog.text, caplog.text


@executorch_available
def test_executorch_int8_kernels_compute_the_model_with_xnnpack_int32_biases(monkeypatch) -> None:
    """With no budget for the bias rounding, every candidate runs on int8, and the file computes the fake-quant
    model with each of their biases rounded to input scale * weight scale (computed here from the read-out)."""
    executorch = backend("executorch")
    monkeypatch.setattr(executorch, "INT8_RELATIVE_ERROR", 1.0)
    model = _calibrated(_tiny_resnet(), (3, 16, 16), share=True)
    x = torch.randn(16, 3, 16, 16)
    integer = integer_model(model)
    program, int8, _ = executorch.lowered_program(ReferenceSource(integer, (x[:8],)))
    assert int8 == RESIDUAL_INT8
    folded = integer.folded((x[:8],))
    rounded = copy.deepcopy(model)
    batchnorms = {"0": "1", "3.conv1": "3.bn1", "4.conv1": "4.bn1"}  # folded into each of them
    for name in int8:  # the folded bias rounded: the difference added to the BatchNorm's shift
        unit = folded.layers[name].scale.double() * folded.layers[name].input.scale
        bias = folded.model.get_submodule(name).bias.double()
        rounded.get_submodule(batchnorms[name]).bias.data += (torch.round(bias / unit) * unit - bias).float()
    with torch.no_grad():
        expected, unrounded = rounded(x), model(x)
    got = executorch._runner(program)(x)
    assert relative_error(got, expected) < 1e-4 < relative_error(got, unrounded), (got, expected, unrounded)


@executorch_available
def test_executorch_file_runs_conv1d_on_int8_where_its_output_is_rounded(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 4, 3),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    model = _calibrated(model, (2, 8))
    with caplog.at_level("INFO", logger="qat_lightning.convert.backends.executorch"):
        _executorch_file_follows_the_model(model, (2, 8), tmp_path)
    assert _int8_layers(caplog.text) == ["0", "2", "5"]  # each reaches the next layer's grid; the Linear gives logits


@executorch_available
def test_executorch_file_of_a_4_bit_cnn_runs_its_convolutions_on_int8(tmp_path, caplog) -> None:
    from qat_lightning import SmallCNN

    torch.manual_seed(0)
    model = _calibrated(SmallCNN(channels=(8, 16)), (1, 8, 8), bits=4)
    with caplog.at_level("INFO", logger="qat_lightning.convert.backends.executorch"):
        _executorch_file_follows_the_model(model, (1, 8, 8), tmp_path)
    assert _int8_layers(caplog.text) == ["features.0", "features.4"]


class _ConvCalledTwice(nn.Module):
    """One convolution applied twice (weights and bias shared by two ops of the exported graph)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.stem(x)))
        x = self.shared(torch.relu(x))
        return self.head(x.mean((2, 3)))


def test_onnx_file_of_a_layer_called_twice_holds_each_bias_once_and_follows_the_model(tmp_path) -> None:
    import onnx

    model = _calibrated(_ConvCalledTwice(), (3, 12, 12))
    x = torch.randn(8, 3, 12, 12)
    result = convert_model(model, (x,), tmp_path, formats=("onnx",), packed=False)
    graph = onnx.load(str(result.paths["onnx"])).graph
    names = [i.name for i in graph.initializer]
    assert len(names) == len(set(names))  # a duplicate initializer becomes a graph input in ONNX Runtime
    adds = [n for n in graph.node if n.op_type == "Add" and any(i.endswith("_as_add2d") for i in n.input)]
    assert len(adds) == 3  # stem, and `shared` twice on one initializer
    with torch.no_grad():
        assert relative_error(backend("onnx").load(result.paths["onnx"])(x), model(x)) < 1e-5
