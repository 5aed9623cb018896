"""Rewrites of the exported ONNX QDQ graph (``onnx.ModelProto``, in place) that keep its numbers and let runtimes
fuse it: each pass states what it changes and why the values stay the same."""

from __future__ import annotations

import numpy as np


def rewrite(proto) -> None:  # type: ignore[no-untyped-def]
    """Every rewrite below, in the order the ONNX backend applies them.

    Input grids keep the exporter's uint8 codes (a grid narrower than 8 bits behind its ``Clip``): int8 codes for
    them (no ``Clip``, no zero point) ran as fast on a Xeon with AMX but saturated oneDNN's AVX2 kernels, which
    shift signed inputs into 0..255 (docs/deploy.md).
    """
    keep_biases_float(proto)
    quantize_before_reshape(proto)
    drop_zero_weight_zero_points(proto)
    drop_debug_metadata(proto)


def drop_debug_metadata(proto) -> None:  # type: ignore[no-untyped-def]
    """Remove what only helps debugging: the exporter's per-node and per-graph strings (source locations, FX node
    text; half the file otherwise), node names (optional in ONNX), the inferred shapes of intermediate values, and
    the long names of intermediate values (``v<i>`` instead; inputs, outputs and weights keep theirs)."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = node.name = ""
    del graph.value_info[:]
    del graph.metadata_props[:]
    del proto.metadata_props[:]
    kept = {v.name for v in (*graph.input, *graph.output)} | {i.name for i in graph.initializer}
    short = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in kept:
                short[name] = node.output[i] = f"v{len(short)}"
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = short.get(name, name)


def drop_zero_weight_zero_points(proto) -> None:  # type: ignore[no-untyped-def]
    """Drop the all-zero zero-point tensors of per-channel weight ``DequantizeLinear`` (0 is the default)."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in initializers:
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is not None and zero_point.data_type == 3 and not numpy_helper.to_array(zero_point).any():
            del node.input[2]  # int8 codes: no zero point means 0 and an int8 input type
    _drop_unused_initializers(proto)


def _drop_unused_initializers(proto) -> None:  # type: ignore[no-untyped-def]
    used = {name for node in proto.graph.node for name in node.input}
    for unused in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(unused)


def keep_biases_float(proto) -> None:  # type: ignore[no-untyped-def]
    """Move the float bias of each Conv/ConvTranspose/Gemm on dequantized inputs into an ``Add`` after it.

    ONNX Runtime otherwise rounds such a bias to int32 on the ``input_scale * weight_scale`` grid
    (``WeightBiasQuantization``), which QAT never did: up to half a step per channel, 5-20% of the logits of
    4-bit models in our tests. As an ``Add`` it stays the trained float bias; OpenVINO fuses it back.
    """
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    produced_by = {out: n for n in proto.graph.node for out in n.output}
    nodes = []
    for node in proto.graph.node:
        nodes.append(node)
        if (
            node.op_type not in ("Conv", "ConvTranspose", "Gemm")
            or len(node.input) < 3
            or node.input[2] not in initializers
        ):
            continue
        source = produced_by.get(node.input[0], node)
        while source.op_type in ("Reshape", "Flatten"):  # a classifier's rounding moved before its flatten
            source = produced_by.get(source.input[0], node)
        if source.op_type != "DequantizeLinear":
            continue
        spatial = next((len(a.ints) for a in node.attribute if a.name == "kernel_shape"), 0)
        bias_name = f"{node.input[2]}_as_add{spatial}d"
        if bias_name not in initializers:  # one initializer per bias, however many layers share it
            bias = numpy_helper.to_array(initializers[node.input[2]]).reshape((1, -1) + (1,) * spatial)
            initializers[bias_name] = numpy_helper.from_array(bias, bias_name)
            proto.graph.initializer.append(initializers[bias_name])
        output = node.output[0]
        node.output[0] = f"{output}_without_bias"
        del node.input[2]
        nodes.append(helper.make_node("Add", [node.output[0], bias_name], [output]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto)


def _readers(nodes) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """``{value name: [nodes reading it]}`` over ``nodes``, in graph order."""
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _array(initializer) -> np.ndarray:  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    return numpy_helper.to_array(initializer)


def quantize_before_reshape(proto) -> None:  # type: ignore[no-untyped-def]
    """``Reshape -> QuantizeLinear -> DequantizeLinear`` (per-tensor) becomes the same rounding first and the
    ``Reshape`` (or ``Flatten``) after it.

    Per-tensor rounding is elementwise, so it gives the same values on either side of a reshape. Before it, the
    rounding follows the op that made the value: OpenVINO fuses a classifier's input rounding into the global
    pool in front of the flatten (int8 pool output, no float round trip), as it does in its own int8 models.
    A rounding behind a ``Clip`` (a grid narrower than 8 bits) is not moved (ONNX Runtime's optimizer then
    computes ``Clip -> QuantizeLinear -> DequantizeLinear -> Reshape`` wrongly: 1% off in our tests).
    """
    initializers = {i.name: i for i in proto.graph.initializer}
    nodes = list(proto.graph.node)
    readers = _readers(nodes)
    for reshape in [n for n in nodes if n.op_type in ("Reshape", "Flatten")]:
        rounding = _per_tensor_rounding(reshape.output[0], readers, initializers)
        if rounding is None:
            continue
        quantize, dequantize = rounding
        rounded = dequantize.output[0]
        quantize.input[0] = reshape.input[0]
        dequantize.output[0] = f"{rounded}_before_reshape"
        reshape.input[0] = dequantize.output[0]
        reshape.output[0] = rounded
        nodes.remove(reshape)
        nodes.insert(nodes.index(dequantize) + 1, reshape)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _per_tensor_rounding(value: str, readers: dict, initializers: dict) -> tuple | None:
    """``(QuantizeLinear, DequantizeLinear)`` when they alone read ``value`` and round it with one scale."""
    quantizes = readers.get(value, [])
    if len(quantizes) != 1 or quantizes[0].op_type != "QuantizeLinear" or quantizes[0].input[0] != value:
        return None
    (quantize,) = quantizes
    if quantize.input[1] not in initializers or _array(initializers[quantize.input[1]]).size != 1:
        return None
    dequantizes = readers.get(quantize.output[0], [])
    if len(dequantizes) != 1 or dequantizes[0].op_type != "DequantizeLinear":
        return None
    return quantize, dequantizes[0]
