"""ONNX export in QDQ form (``QuantizeLinear``/``DequantizeLinear`` around each quantized layer's input and weight).

The exported graph is the BatchNorm-folded model of ``int8.float_model_for_int8`` with the trained grids made
explicit: each int8 layer's weight is ``DequantizeLinear(int8 codes, per-channel scale)`` and its input passes
``[Clip] -> QuantizeLinear -> DequantizeLinear`` with the trained scale and zero point (the clip narrows the
8-bit ONNX grid to a ``b < 8``-bit trained one). ONNX Runtime fuses these patterns into its integer kernels.
Needs the ``onnx`` extra (``pip install qat-lightning[onnx]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat_lightning.convert.int8 import IntegerLayer, float_model_for_int8

ONNX_OPSET = 17


class _PerChannelWeightGrid(nn.Module):
    """Parametrization ``w -> fake_quantize_per_channel(w)`` exported as QuantizeLinear/DequantizeLinear."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(weight, self.scale, self.zero_point, 0, -128, 127)


class _QuantizeInput:
    """Forward pre-hook: the layer input on its trained (8-bit container) grid."""

    def __init__(self, layer: IntegerLayer) -> None:
        self.scale, self.zero_point = layer.input_scale, layer.input_zero_point

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = torch.fake_quantize_per_tensor_affine(args[0], self.scale, self.zero_point, 0, 255)
        return (x, *args[1:])


def export_onnx_qdq(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path, opset: int = ONNX_OPSET
) -> Path:
    """Write a trained fake-quant ``model`` (left untouched) as an ONNX QDQ file with a dynamic batch dimension.

    Args:
        model: the trained fake-quant model.
        example_inputs: one batch of the model's positional inputs.
        path: the ``.onnx`` file to write.
        opset: ONNX opset (13 or newer, for per-channel ``QuantizeLinear``).
    """
    example_inputs = tuple(example_inputs)
    prepared = float_model_for_int8(model, example_inputs)
    float_model = prepared.model
    for name, layer in prepared.int8_layers.items():
        module = float_model.get_submodule(name)
        module.register_forward_pre_hook(_QuantizeInput(layer))
        parametrize.register_parametrization(module, "weight", _PerChannelWeightGrid(layer.scale))
    input_names = [f"input{i}" for i in range(len(example_inputs))]
    path = Path(path)
    torch.onnx.export(
        float_model,
        example_inputs,
        str(path),
        input_names=input_names,
        output_names=["output"],
        dynamic_axes={name: {0: "batch"} for name in [*input_names, "output"]},
        opset_version=opset,
        dynamo=False,
    )
    _store_weights_as_int8(path)
    return path


def _store_weights_as_int8(path: Path) -> None:
    """Replace each ``QuantizeLinear(float weight)`` by the int8 codes it computes (4x smaller file).

    The exporter writes weights as float initializers followed by QuantizeLinear -> DequantizeLinear; the
    canonical QDQ form (as ONNX Runtime's own quantizer writes it) stores the int8 codes and keeps only the
    DequantizeLinear.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in constants:  # deduplicated constants
            constants[node.output[0]] = constants[node.input[0]]
    initializers = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        if not all(name in constants for name in node.input[:3]):
            continue
        weight, scale, zero_point = (constants[name] for name in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        codes = np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.float32)
        codes = np.clip(codes, -128, 127).astype(np.int8)
        graph.initializer.remove(initializers.pop(node.input[0]))
        graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        graph.node.remove(node)
    onnx.save(proto, str(path))
