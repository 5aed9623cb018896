"""The ONNX graph rewrites keep the graph's numbers (ONNX Runtime before and after) and give the fusable form."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qat_lightning.convert.backends import onnx_passes

SCALE = 0.05


def _initializer(name: str, value, dtype=np.float32):  # type: ignore[no-untyped-def]
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _seven_bit_rounding(value: str, out: str) -> list:
    """``Clip(0, 127 * s) -> QuantizeLinear(uint8) -> DequantizeLinear``: the exporter's 7-bit grid of a value."""
    return [
        helper.make_node("Clip", [value, "low", "high"], [f"{out}_clipped"]),
        helper.make_node("QuantizeLinear", [f"{out}_clipped", "scale", "zero"], [f"{out}_codes"]),
        helper.make_node("DequantizeLinear", [f"{out}_codes", "scale", "zero"], [out]),
    ]


def _classifier_head(negative_input: bool) -> onnx.ModelProto:
    """input [2, 3, 4, 4] -> Relu -> 8-bit rounding (``negative_input``: no Relu, a signed grid) -> MaxPool ->
    7-bit rounding -> ReduceMean -> Reshape -> 7-bit rounding -> Gemm(+bias) -> output [2, 5]: the tail of an
    exported residual net."""
    nodes = [] if negative_input else [helper.make_node("Relu", ["input"], ["relu"])]
    first_zero = "signed_zero" if negative_input else "zero"
    nodes += [
        helper.make_node("QuantizeLinear", ["input" if negative_input else "relu", "scale", first_zero], ["q0"]),
        helper.make_node("DequantizeLinear", ["q0", "scale", first_zero], ["r0"]),
        helper.make_node("MaxPool", ["r0"], ["pooled"], kernel_shape=[2, 2]),
        *_seven_bit_rounding("pooled", "r1"),
        helper.make_node("ReduceMean", ["r1", "axes"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
        *_seven_bit_rounding("flat", "r2"),
        helper.make_node("Gemm", ["r2", "weight", "bias"], ["output"], transB=1),
    ]
    rng = np.random.default_rng(0)
    initializers = [
        _initializer("scale", SCALE),
        _initializer("zero", 0, np.uint8),
        _initializer("signed_zero", 0, np.int8),
        _initializer("low", 0.0),
        _initializer("high", 127 * SCALE),
        _initializer("axes", [2, 3], np.int64),
        _initializer("shape", [-1, 3], np.int64),
        _initializer("weight", rng.normal(size=(5, 3))),
        _initializer("bias", rng.normal(size=5)),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 5])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _rewritten(proto: onnx.ModelProto) -> onnx.ModelProto:
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(proto)
    onnx_passes.rewrite(rewritten)  # the ONNX backend's rewrites, in its order
    onnx.checker.check_model(rewritten)
    return rewritten


@pytest.mark.parametrize("negative_input", [False, True])
def test_rewrites_keep_the_numbers(negative_input):
    proto = _classifier_head(negative_input)
    x = np.random.default_rng(1).normal(scale=4.0, size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(_rewritten(proto), x), _run(proto, x))


def test_classifier_input_is_rounded_at_the_pool_in_int8_without_clip():
    graph = _rewritten(_classifier_head(negative_input=False)).graph
    made_by = {out: n for n in graph.node for out in n.output}
    ops = [n.op_type for n in graph.node]
    assert "Clip" not in ops and ops.count("Relu") == 1  # the 7-bit grids of values >= 0 need no clip
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    reshape = made_by[gemm.input[0]]
    assert reshape.op_type == "Reshape" and len(gemm.input) == 2  # the bias went to an Add after the Gemm
    dequantize = made_by[reshape.input[0]]
    quantize = made_by[dequantize.input[0]]
    assert (dequantize.op_type, quantize.op_type, made_by[quantize.input[0]].op_type) == (
        "DequantizeLinear",
        "QuantizeLinear",
        "ReduceMean",
    )
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert initializers[quantize.input[2]].dtype == np.int8


def test_a_value_that_may_be_negative_keeps_its_clip_at_zero_as_a_relu():
    graph = _rewritten(_classifier_head(negative_input=True)).graph
    made_by = {out: n for n in graph.node for out in n.output}
    (pool,) = [n for n in graph.node if n.op_type == "MaxPool"]
    (relu,) = [n for n in graph.node if n.op_type == "Relu"]
    assert made_by[relu.input[0]] is pool  # signed codes: the pool's output can be negative, the 7-bit grid not
    assert "Clip" not in {n.op_type for n in graph.node}


def _signed_input_conv(zero_point: int, clip: bool) -> onnx.ModelProto:
    """input [2, 3, 5, 5] -> (``clip``: Clip to the 7-bit grid ``0..127`` around ``zero_point``) ->
    QuantizeLinear(uint8, ``zero_point``) -> DequantizeLinear -> Conv on int8 weights -> output: a network's
    first convolution on its signed input."""
    rng = np.random.default_rng(1)
    source = "clipped" if clip else "input"
    nodes = [helper.make_node("Clip", ["input", "low", "high"], ["clipped"])] if clip else []
    nodes += [
        helper.make_node("QuantizeLinear", [source, "scale", "zero"], ["codes"]),
        helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], ["rounded"]),
        helper.make_node("DequantizeLinear", ["weight_codes", "weight_scale"], ["weight"], axis=0),
        helper.make_node("Conv", ["rounded", "weight"], ["output"], kernel_shape=[3, 3]),
    ]
    initializers = [
        _initializer("scale", SCALE),
        _initializer("zero", zero_point, np.uint8),
        _initializer("low", -zero_point * SCALE),
        _initializer("high", (127 - zero_point) * SCALE),
        _initializer("weight_codes", rng.integers(-127, 128, size=(4, 3, 3, 3)), np.int8),
        _initializer("weight_scale", rng.uniform(0.01, 0.02, size=4)),
    ]
    graph = helper.make_graph(
        nodes,
        "first_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4, 3, 3])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _zero_points(proto: onnx.ModelProto) -> list[tuple[int, int]]:
    """``(ONNX element type, value)`` of the activation zero point of every QuantizeLinear/DequantizeLinear."""
    initializers = {i.name: i for i in proto.graph.initializer}
    return [
        (initializers[n.input[2]].data_type, int(numpy_helper.to_array(initializers[n.input[2]])))
        for n in proto.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3
    ]


@pytest.mark.parametrize(("zero_point", "clip"), [(63, True), (1, True), (127, True), (128, False)])
def test_a_signed_grid_that_fits_int8_loses_its_zero_point(zero_point, clip):
    proto = _signed_input_conv(zero_point, clip)
    x = np.random.default_rng(2).normal(scale=4.0, size=(2, 3, 5, 5)).astype(np.float32)  # beyond the grid
    rewritten = _rewritten(proto)
    assert _zero_points(rewritten) == [(TensorProto.INT8, 0)] * 2
    np.testing.assert_array_equal(_run(rewritten, x), _run(proto, x))


def test_a_grid_wider_than_int8_around_its_zero_point_keeps_it():
    proto = _signed_input_conv(100, clip=False)  # codes 0..255 around 100: -100..155 does not fit int8
    assert _zero_points(_rewritten(proto)) == [(TensorProto.UINT8, 100)] * 2
