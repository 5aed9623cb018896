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


def _rounding(value: str, out: str, bits: int) -> list:
    """``QuantizeLinear(uint8) -> DequantizeLinear``, behind ``Clip(0, 127 * s)`` at 7 bits: the exporter's 8- or
    7-bit grid of a value."""
    clip = [helper.make_node("Clip", [value, "low", "high"], [f"{out}_clipped"])] if bits == 7 else []
    source = f"{out}_clipped" if bits == 7 else value
    return [
        *clip,
        helper.make_node("QuantizeLinear", [source, "scale", "zero"], [f"{out}_codes"]),
        helper.make_node("DequantizeLinear", [f"{out}_codes", "scale", "zero"], [out]),
    ]


def _classifier_head(negative_input: bool, bits: int = 8) -> onnx.ModelProto:
    """input [2, 3, 4, 4] -> Relu -> 8-bit rounding (``negative_input``: no Relu, a signed grid) -> MaxPool ->
    ``bits`` rounding -> ReduceMean -> Reshape -> ``bits`` rounding -> Gemm(+bias) -> output [2, 5]: the tail of
    an exported residual net."""
    nodes = [] if negative_input else [helper.make_node("Relu", ["input"], ["relu"])]
    first_zero = "signed_zero" if negative_input else "zero"
    nodes += [
        helper.make_node("QuantizeLinear", ["input" if negative_input else "relu", "scale", first_zero], ["q0"]),
        helper.make_node("DequantizeLinear", ["q0", "scale", first_zero], ["r0"]),
        helper.make_node("MaxPool", ["r0"], ["pooled"], kernel_shape=[2, 2]),
        *_rounding("pooled", "r1", bits),
        helper.make_node("ReduceMean", ["r1", "axes"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
        *_rounding("flat", "r2", bits),
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


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("negative_input", [False, True])
def test_rewrites_keep_the_numbers(negative_input, bits):
    proto = _classifier_head(negative_input, bits)
    x = np.random.default_rng(1).normal(scale=4.0, size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(_rewritten(proto), x), _run(proto, x))


def test_classifier_input_is_rounded_at_the_pool():
    graph = _rewritten(_classifier_head(negative_input=False)).graph
    made_by = {out: n for n in graph.node for out in n.output}
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


def _zero_points(proto: onnx.ModelProto) -> list[tuple[int, int]]:
    """``(ONNX element type, value)`` of the activation zero point of every QuantizeLinear/DequantizeLinear."""
    initializers = {i.name: i for i in proto.graph.initializer}
    return [
        (initializers[n.input[2]].data_type, int(numpy_helper.to_array(initializers[n.input[2]])))
        for n in proto.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3
    ]


@pytest.mark.parametrize("negative_input", [False, True])
def test_narrow_grids_keep_their_clip_and_unsigned_codes(negative_input):
    """A 7-bit grid stays ``Clip -> QuantizeLinear(uint8)``: unsigned codes below 128 never saturate oneDNN's AVX2
    int8 kernels, the reason for such a grid (``reduce_range=True``); int8 codes would be shifted past 127 there."""
    proto = _classifier_head(negative_input, bits=7)
    rewritten = _rewritten(proto)
    clips = [n for n in rewritten.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2
    assert all(element == TensorProto.UINT8 for element, _ in _zero_points(rewritten)[2:])
    assert _zero_points(rewritten) == _zero_points(proto)
