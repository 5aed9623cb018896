"""Rewrites of the exported ONNX QDQ graph (``onnx.ModelProto``, in place) that keep its numbers and let runtimes
fuse it: each pass states what it changes and why the values stay the same."""

from __future__ import annotations

import numpy as np


def rewrite(proto) -> None:  # type: ignore[no-untyped-def]
    """Every rewrite below, in the order the ONNX backend applies them (each later one reads the form the earlier
    ones leave: the signed-codes pass removes the ``Clip`` that ``quantize_before_reshape`` would not move)."""
    keep_biases_float(proto)
    signed_codes_on_nonnegative_values(proto)
    quantize_before_reshape(proto)
    zero_point_free_codes(proto)
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


def signed_codes_on_nonnegative_values(proto) -> None:  # type: ignore[no-untyped-def]
    """``Clip -> QuantizeLinear(uint8)`` on a grid ending at code 127 becomes ``QuantizeLinear(int8)`` where the
    clipped value is never negative, and ``Relu -> QuantizeLinear(int8)`` where it may be.

    A 7-bit input grid (``activation_bits=7``, torch.ao's ``reduce_range``; codes ``0..127``) needs a ``Clip`` in
    the uint8 container, and the ``Clip`` keeps OpenVINO from fusing the rounding into the kernel before it. In the
    int8 container the grid's top is the container's, and on values that are never negative the codes never go
    below the zero point, so the same codes come out with no ``Clip``. (On VNNI CPUs without AMX oneDNN then
    compensates the signed inputs in every convolution: the default 8-bit grid, in uint8, is faster.) A
    ``Clip(0, high)`` (the exporter's merged ``relu -> clamp``) of a
    value that may be negative becomes that ``Relu``.
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    produced_by = {out: n for n in proto.graph.node for out in n.output}
    readers = _readers(proto.graph.node)
    dropped = set()
    for clip in [n for n in proto.graph.node if n.op_type == "Clip"]:
        (quantize, *others) = readers.get(clip.output[0], [None])
        if len(clip.input) != 3 or others or quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        if not set(clip.input[1:]) | set(quantize.input[1:]) <= set(initializers):
            continue
        scale, zero_point = (_array(initializers[n]) for n in quantize.input[1:3])
        low, high = (float(_array(initializers[n])) for n in clip.input[1:3])
        nonnegative_input = low <= 0 and _nonnegative(clip.input[0], produced_by, initializers)
        if not (nonnegative_input or low == 0):
            continue
        dequantizes = readers.get(quantize.output[0], [])
        if zero_point.dtype != np.uint8 or zero_point.size != 1 or int(zero_point) > 127:
            continue
        if not np.isclose(high, (127 - int(zero_point)) * float(scale), rtol=1e-6, atol=0):
            continue
        if not all(d.op_type == "DequantizeLinear" and d.input[2] == quantize.input[2] for d in dequantizes):
            continue
        signed = f"{quantize.input[2]}_int8"
        if signed not in initializers:
            initializers[signed] = numpy_helper.from_array(zero_point.astype(np.int8), signed)
            proto.graph.initializer.append(initializers[signed])
        for node in (quantize, *dequantizes):
            node.input[2] = signed
        if nonnegative_input:
            quantize.input[0] = clip.input[0]
            dropped.add(id(clip))
        else:
            clip.op_type = "Relu"
            del clip.input[1:]
    nodes = [n for n in proto.graph.node if id(n) not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto)


def zero_point_free_codes(proto) -> None:  # type: ignore[no-untyped-def]
    """A per-tensor ``QuantizeLinear(uint8)`` with zero point ``z > 0`` whose codes stay within ``z - 128 ..
    z + 127`` becomes ``QuantizeLinear(int8)`` with zero point 0, its ``DequantizeLinear`` too.

    The codes' range is the container's (``0..255``) or, after a ``Clip`` of the value, the codes of the clip's
    bounds: a 7-bit grid (codes ``0..127``) always fits. ``DequantizeLinear`` gives ``(q - z) * s`` before and
    ``q' * s`` after, with ``q' = q - z`` (the rounding happens before the zero point is added, so the codes move
    by exactly ``z``): the same values. A signed value's grid (the network input, an input after a residual add
    without ``Relu``) then has no zero point: oneDNN (OpenVINO) otherwise adds a zero-point compensation to the
    kernel that reads it (ResNet-20's first convolution at batch 1: 20 us instead of 11 us).
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    produced_by = {out: n for n in proto.graph.node for out in n.output}
    readers = _readers(proto.graph.node)
    zero = "zero_point_int8_0"
    for quantize in [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]:
        if len(quantize.input) < 3 or not set(quantize.input[1:3]) <= set(initializers):
            continue
        scale, zero_point = (_array(initializers[n]) for n in quantize.input[1:3])
        if zero_point.dtype != np.uint8 or zero_point.size != 1 or scale.size != 1 or int(zero_point) == 0:
            continue
        low_code, high_code = _code_bounds(quantize, float(scale), int(zero_point), produced_by, initializers)
        if low_code - int(zero_point) < -128 or high_code - int(zero_point) > 127:
            continue
        dequantizes = readers.get(quantize.output[0], [])
        if not all(d.op_type == "DequantizeLinear" and d.input[1:3] == quantize.input[1:3] for d in dequantizes):
            continue
        if zero not in initializers:
            initializers[zero] = numpy_helper.from_array(np.array(0, np.int8), zero)
            proto.graph.initializer.append(initializers[zero])
        for node in (quantize, *dequantizes):
            node.input[2] = zero
    _drop_unused_initializers(proto)


def _code_bounds(quantize, scale: float, zero_point: int, produced_by: dict, initializers: dict) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The lowest and highest uint8 code ``quantize`` can give: ``0..255``, narrowed by a ``Clip`` before it."""
    clip = produced_by.get(quantize.input[0])
    if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or not set(clip.input[1:]) <= set(initializers):
        return 0, 255
    low, high = (float(_array(initializers[n])) for n in clip.input[1:3])
    return max(0, zero_point + int(np.floor(low / scale))), min(255, zero_point + int(np.ceil(high / scale)))


# Ops whose output is never negative when their first input is not: pooling and reshaping.
_SIGN_PRESERVING = frozenset(
    {"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Reshape", "Flatten"}
)


def _nonnegative(value: str, produced_by: dict, initializers: dict) -> bool:
    """Whether ``value`` is never negative: a ``Relu`` output, a sign-preserving op of such a value, or the
    ``DequantizeLinear(QuantizeLinear(v))`` round trip of one (codes of a value >= 0 are >= the zero point)."""
    node = produced_by.get(value)
    while node is not None:
        if node.op_type == "Relu":
            return True
        if node.op_type == "DequantizeLinear":
            quantize = produced_by.get(node.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[1:] != node.input[1:]:
                return False
            if node.input[1] not in initializers or (_array(initializers[node.input[1]]) <= 0).any():
                return False
            node = produced_by.get(quantize.input[0])
        elif node.op_type in _SIGN_PRESERVING:
            node = produced_by.get(node.input[0])
        else:
            return False
    return False


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
    Runs after ``signed_codes_on_nonnegative_values``, which removes the ``Clip`` of such a rounding; a ``Clip``
    is not moved (ONNX Runtime's optimizer then computes ``Clip -> QuantizeLinear -> DequantizeLinear ->
    Reshape`` wrongly: 1% off in our tests).
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
