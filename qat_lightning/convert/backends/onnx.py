"""``<name>_int8.onnx``: the reference int8 program in ONNX QDQ form (``QuantizeLinear``/``DequantizeLinear``).

Written by torch's ``torch.export``-based ONNX exporter from the reference program: int8 weight initializers with
per-channel scales, each integer layer's input on its trained grid (a ``Clip`` in front of ``QuantizeLinear``
narrows the 8-bit container to a ``b < 8``-bit grid). Runs in ONNX Runtime, OpenVINO and TensorRT.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qat_lightning.convert.reference import ReferenceSource

NAME = "onnx"
FILE_NAME = "{name}_int8.onnx"
LOAD_HINT = "onnxruntime.InferenceSession('{path}')"  # how a user runs the file, shown at fit end
ONNX_OPSET = 18


def requirement() -> str | None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"`pip install {' '.join(missing)}`" if missing else None


def write(source: ReferenceSource, path: Path) -> None:
    program = source.program(torch.uint8)
    names = [f"input{i}" for i in range(len(source.example_inputs))]
    quiet = logging.getLogger("onnxscript").level
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            program,
            source.example_inputs,
            path,
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=names,
            output_names=["output"],
            external_data=False,
            verbose=False,
        )
    finally:
        logging.getLogger("onnxscript").setLevel(quiet)
    import onnx

    proto = onnx.load(str(path))
    _keep_biases_float(proto)
    _signed_codes_after_relu(proto)
    _drop_zero_weight_zero_points(proto)
    _drop_debug_metadata(proto)
    onnx.save(proto, str(path))


def _drop_debug_metadata(proto) -> None:  # type: ignore[no-untyped-def]
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


def _drop_zero_weight_zero_points(proto) -> None:  # type: ignore[no-untyped-def]
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


def _keep_biases_float(proto) -> None:  # type: ignore[no-untyped-def]
    """Move the float bias of each Conv/Gemm on dequantized inputs into an ``Add`` after it.

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
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        if produced_by.get(node.input[0], node).op_type != "DequantizeLinear":
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


def _signed_codes_after_relu(proto) -> None:  # type: ignore[no-untyped-def]
    """``Relu -> Clip -> QuantizeLinear(uint8)`` on a grid ending at code 127 becomes ``Relu -> QuantizeLinear(int8)``.

    The 7-bit input grid of an 8-bit layer (codes ``0..127``) needs a ``Clip`` in the uint8 container, and the
    ``Clip`` keeps OpenVINO from fusing the rounding into the kernel before it. In the int8 container the grid's
    top is the container's, and after a ``Relu`` the codes never go below the zero point, so the same codes come
    out with no ``Clip``. A ``Clip(0, high)`` (the exporter's merged ``relu -> clamp``) becomes that ``Relu``.
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    produced_by = {out: n for n in proto.graph.node for out in n.output}
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped = set()
    for clip in [n for n in proto.graph.node if n.op_type == "Clip"]:
        source = produced_by.get(clip.input[0])
        (quantize, *others) = readers.get(clip.output[0], [None])
        if len(clip.input) != 3 or others or quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        if not set(clip.input[1:]) | set(quantize.input[1:]) <= set(initializers):
            continue
        scale, zero_point = (numpy_helper.to_array(initializers[n]) for n in quantize.input[1:3])
        low, high = (float(numpy_helper.to_array(initializers[n])) for n in clip.input[1:3])
        after_relu = source is not None and source.op_type == "Relu" and low <= 0
        if not (after_relu or low == 0):  # the exporter merges ``relu -> clamp`` into ``Clip(0, high)``
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
        if after_relu:
            quantize.input[0] = clip.input[0]
            dropped.add(id(clip))
        else:
            clip.op_type = "Relu"
            del clip.input[1:]
    nodes = [n for n in proto.graph.node if id(n) not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto)


def load(path: Path) -> Callable[..., torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run
