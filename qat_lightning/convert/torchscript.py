"""A self-contained TorchScript file of the lowered int8 graph: ``torch.jit.load(path)`` runs it.

oneDNN's int8 kernels take weights prepacked into an opaque (non-serialisable) layout. Each kernel call of
the lowered graph therefore becomes a small scripted module that stores its weight as a plain int8 tensor
and prepacks it when it is built and again when it is loaded (TorchScript calls ``__setstate__``). The
quantize/dequantize steps become plain ATen arithmetic, so loading needs nothing beyond ``torch``.
"""

import operator
import warnings

import torch
from torch import nn

# TorchScript's type for an ATen ``Scalar`` argument.
Number = int | float | complex


def _op(namespace: str, name: str, overload: str | None = None) -> object:
    """``torch.ops.<namespace>.<name>[.<overload>]``, or ``None`` where this torch build lacks it (no oneDNN/MKL)."""
    packet = getattr(getattr(torch.ops, namespace), name, None)
    return packet if packet is None or overload is None else getattr(packet, overload)


_QCONV = _op("onednn", "qconv_pointwise", "default")
_QCONV_ADD = _op("onednn", "qconv2d_pointwise", "binary")
_QLINEAR = _op("onednn", "qlinear_pointwise", "default")
ONEDNN_INT8_OPS = frozenset({_QCONV, _QCONV_ADD, _QLINEAR} - {None})
_DROPPED = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
# Layers that stay float are also prepacked by inductor's freezing passes (for oneDNN / MKL float kernels).
# (The freezing passes call some of them by their op packet, some by an overload: compare packets.)
_MKLDNN_CONV = _op("mkldnn", "_convolution_pointwise")
_MKL_LINEAR = _op("mkl", "_mkl_linear")
_FLOAT_PACKED = {_MKLDNN_CONV, _MKL_LINEAR} - {None}


def _packet(target: object) -> object:
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, quant_min, quant_max)`` as uint8 (round half to even)."""
    return torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(quant_min, quant_max).to(torch.uint8)


def dequantize_uint8(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` as float32."""
    return (q.to(torch.float32) - zero_point) * scale


def _scalars(values: list[float]) -> list[Number | None]:
    out = torch.jit.annotate(list[Number | None], [])
    for v in values:
        out.append(v)
    return out


class QConv(nn.Module):
    """``onednn.qconv_pointwise``: uint8 input, int8 per-channel weight, fused post-op, uint8 or float output.

    ``weight`` (int8, ``(C_out, C_in / groups, *kernel)``) and ``weight_scale`` (``(C_out,)``) are what is
    saved; the prepacked copy is rebuilt on load.
    """

    post_op_scalars: list[float]

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        input_zero_point: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        output_scale: float,
        output_zero_point: int,
        output_dtype: torch.dtype,
        post_op: str,
        post_op_scalars: list[float],
        post_op_algorithm: str,
    ) -> None:
        super().__init__()
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.output_scale, self.output_zero_point, self.output_dtype = output_scale, output_zero_point, output_dtype
        self.post_op, self.post_op_scalars, self.post_op_algorithm = post_op, post_op_scalars, post_op_algorithm
        self.weight_zero_point = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.packed_weight = self._pack()

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            self.weight,
            self.weight_scale,
            self.input_scale,
            self.input_zero_point,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qconv_pointwise(
            x,
            self.input_scale,
            self.input_zero_point,
            self.packed_weight,
            self.weight_scale,
            self.weight_zero_point,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.post_op,
            _scalars(self.post_op_scalars),
            self.post_op_algorithm,
        )

    @torch.jit.export
    def __getstate__(self):  # type: ignore[no-untyped-def]
        return (
            self.weight,
            self.weight_scale,
            self.bias,
            self.input_scale,
            self.input_zero_point,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.post_op,
            self.post_op_scalars,
            self.post_op_algorithm,
            self.training,
        )

    @torch.jit.export
    def __setstate__(
        self,
        state: tuple[
            torch.Tensor,
            torch.Tensor,
            torch.Tensor,
            float,
            int,
            list[int],
            list[int],
            list[int],
            int,
            float,
            int,
            torch.dtype,
            str,
            list[float],
            str,
            bool,
        ],
    ) -> None:
        self.weight, self.weight_scale, self.bias = state[0], state[1], state[2]
        self.input_scale, self.input_zero_point = state[3], state[4]
        self.stride, self.padding, self.dilation, self.groups = state[5], state[6], state[7], state[8]
        self.output_scale, self.output_zero_point, self.output_dtype = state[9], state[10], state[11]
        self.post_op, self.post_op_scalars, self.post_op_algorithm = state[12], state[13], state[14]
        self.training = state[15]
        self.weight_zero_point = torch.zeros(self.weight.shape[0], dtype=torch.int64)
        self.packed_weight = self._pack()


class QConvAdd(nn.Module):
    """``onednn.qconv2d_pointwise.binary``: ``post_op(conv(x) + accum)`` requantized, written into ``accum``.

    ``accum`` is the uint8 residual branch with its own scale and zero point (see ``QConv`` for the rest).
    """

    unary_post_op: str | None
    unary_post_op_scalars: list[float]
    unary_post_op_algorithm: str | None

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        input_zero_point: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        output_scale: float,
        output_zero_point: int,
        output_dtype: torch.dtype,
        accum_scale: float,
        accum_zero_point: int,
        binary_post_op: str,
        alpha: float,
        unary_post_op: str | None,
        unary_post_op_scalars: list[float],
        unary_post_op_algorithm: str | None,
    ) -> None:
        super().__init__()
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.output_scale, self.output_zero_point, self.output_dtype = output_scale, output_zero_point, output_dtype
        self.accum_scale, self.accum_zero_point = accum_scale, accum_zero_point
        self.binary_post_op, self.alpha = binary_post_op, alpha
        self.unary_post_op, self.unary_post_op_scalars = unary_post_op, unary_post_op_scalars
        self.unary_post_op_algorithm = unary_post_op_algorithm
        self.weight_zero_point = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.packed_weight = self._pack()

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            self.weight,
            self.weight_scale,
            self.input_scale,
            self.input_zero_point,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            None,
        )

    def forward(self, x: torch.Tensor, accum: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            x,
            self.input_scale,
            self.input_zero_point,
            self.packed_weight,
            self.weight_scale,
            self.weight_zero_point,
            accum,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.accum_scale,
            self.accum_zero_point,
            self.binary_post_op,
            self.alpha,
            self.unary_post_op,
            _scalars(self.unary_post_op_scalars),
            self.unary_post_op_algorithm,
        )

    @torch.jit.export
    def __getstate__(self):  # type: ignore[no-untyped-def]
        return (
            self.weight,
            self.weight_scale,
            self.bias,
            self.input_scale,
            self.input_zero_point,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.accum_scale,
            self.accum_zero_point,
            self.binary_post_op,
            self.alpha,
            self.unary_post_op,
            self.unary_post_op_scalars,
            self.unary_post_op_algorithm,
            self.training,
        )

    @torch.jit.export
    def __setstate__(
        self,
        state: tuple[
            torch.Tensor,
            torch.Tensor,
            torch.Tensor,
            float,
            int,
            list[int],
            list[int],
            list[int],
            int,
            float,
            int,
            torch.dtype,
            float,
            int,
            str,
            float,
            str | None,
            list[float],
            str | None,
            bool,
        ],
    ) -> None:
        self.weight, self.weight_scale, self.bias = state[0], state[1], state[2]
        self.input_scale, self.input_zero_point = state[3], state[4]
        self.stride, self.padding, self.dilation, self.groups = state[5], state[6], state[7], state[8]
        self.output_scale, self.output_zero_point, self.output_dtype = state[9], state[10], state[11]
        self.accum_scale, self.accum_zero_point = state[12], state[13]
        self.binary_post_op, self.alpha = state[14], state[15]
        self.unary_post_op, self.unary_post_op_scalars, self.unary_post_op_algorithm = state[16], state[17], state[18]
        self.training = state[19]
        self.weight_zero_point = torch.zeros(self.weight.shape[0], dtype=torch.int64)
        self.packed_weight = self._pack()


class QLinear(nn.Module):
    """``onednn.qlinear_pointwise``: uint8 input, int8 per-channel weight ``(C_out, C_in)``, fused post-op."""

    post_op_scalars: list[float]

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        input_zero_point: int,
        output_scale: float,
        output_zero_point: int,
        output_dtype: torch.dtype,
        post_op: str,
        post_op_scalars: list[float],
        post_op_algorithm: str,
    ) -> None:
        super().__init__()
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.output_scale, self.output_zero_point, self.output_dtype = output_scale, output_zero_point, output_dtype
        self.post_op, self.post_op_scalars, self.post_op_algorithm = post_op, post_op_scalars, post_op_algorithm
        self.weight_zero_point = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.packed_weight = torch.ops.onednn.qlinear_prepack(self.weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            x,
            self.input_scale,
            self.input_zero_point,
            self.packed_weight,
            self.weight_scale,
            self.weight_zero_point,
            self.bias,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.post_op,
            _scalars(self.post_op_scalars),
            self.post_op_algorithm,
        )

    @torch.jit.export
    def __getstate__(self):  # type: ignore[no-untyped-def]
        return (
            self.weight,
            self.weight_scale,
            self.bias,
            self.input_scale,
            self.input_zero_point,
            self.output_scale,
            self.output_zero_point,
            self.output_dtype,
            self.post_op,
            self.post_op_scalars,
            self.post_op_algorithm,
            self.training,
        )

    @torch.jit.export
    def __setstate__(
        self,
        state: tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, float, int, float, int, torch.dtype, str, list[float], str, bool
        ],
    ) -> None:
        self.weight, self.weight_scale, self.bias = state[0], state[1], state[2]
        self.input_scale, self.input_zero_point = state[3], state[4]
        self.output_scale, self.output_zero_point, self.output_dtype = state[5], state[6], state[7]
        self.post_op, self.post_op_scalars, self.post_op_algorithm = state[8], state[9], state[10]
        self.training = state[11]
        self.weight_zero_point = torch.zeros(self.weight.shape[0], dtype=torch.int64)
        self.packed_weight = torch.ops.onednn.qlinear_prepack(self.weight, None)


# ---------------------------------------------------------------------------------------------- graph rewrite


def _constant(gm: torch.fx.GraphModule, arg: object) -> object:
    """The value of a graph argument: the attribute a ``get_attr`` node names (detached), else the argument."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = gm
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value.detach()
    return arg


def _floats(values: object) -> list[float]:
    return [float(v) for v in (values or [])]


def _unpacked(packed: torch.Tensor) -> torch.Tensor:
    """The plain int8 weight behind a oneDNN-prepacked one (in the layout the prepack op takes)."""
    return packed.to_dense()


def _call_args(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, object]:
    """A call's arguments by their schema names, ``get_attr`` constants resolved to their values."""
    names = [argument.name for argument in node.target._schema.arguments][: len(node.args)]
    pairs = [*zip(names, node.args, strict=True), *node.kwargs.items()]
    return {name: _constant(gm, value) for name, value in pairs}


def _runtime_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[nn.Module, tuple[torch.fx.Node, ...]]:
    """The scripted module replacing one oneDNN call, and the call's dynamic inputs."""
    a = _call_args(gm, node)
    weight_scale = a["w_scale"]
    bias = a["bias"] if a["bias"] is not None else torch.zeros(weight_scale.numel())
    common = {
        "weight_scale": weight_scale,
        "bias": bias,
        "input_scale": a["x_scale"],
        "input_zero_point": a["x_zero_point"],
        "output_scale": a["output_scale"],
        "output_zero_point": a["output_zero_point"],
        "output_dtype": a["output_dtype"],
    }
    conv = {"stride": a.get("stride"), "padding": a.get("padding"), "dilation": a.get("dilation")}
    if node.target is _QCONV:
        module = QConv(
            _unpacked(a["qw"]),
            **common,
            **conv,
            groups=a["groups"],
            post_op=a["attr"],
            post_op_scalars=_floats(a["scalars"]),
            post_op_algorithm=a["algorithm"] or "",
        )
        return module, (node.args[0],)
    if node.target is _QCONV_ADD:
        module = QConvAdd(
            _unpacked(a["qw"]),
            **common,
            **conv,
            groups=a["groups"],
            accum_scale=a["accum_scale"],
            accum_zero_point=a["accum_zero_point"],
            binary_post_op=a["binary_attr"],
            alpha=float(a["alpha"]),
            unary_post_op=a["unary_attr"],
            unary_post_op_scalars=_floats(a["unary_scalars"]),
            unary_post_op_algorithm=a["unary_algorithm"],
        )
        return module, (node.args[0], node.args[6])
    if node.target is _QLINEAR:
        module = QLinear(
            _unpacked(a["qw"]).t().contiguous(),  # the prepacked linear weight is (C_in, C_out)
            **common,
            post_op=a["post_op_name"],
            post_op_scalars=_floats(a["post_op_args"]),
            post_op_algorithm=a["post_op_algorithm"] or "",
        )
        return module, (node.args[0],)
    raise NotImplementedError(f"no TorchScript runtime module for {node.target}")


def _unpack_float_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Turn a prepacked float conv/linear back into ``aten.convolution`` / ``aten.linear`` with a plain weight."""
    if _packet(node.target) is _MKL_LINEAR:
        x, _, weight, bias, _ = node.args  # the op keeps the original weight next to the packed one
        node.target, node.args = torch.ops.aten.linear, (x, weight, bias)
        return
    x, packed, bias, padding, stride, dilation, groups, post_op, *_ = node.args
    if post_op != "none":
        raise NotImplementedError(f"float convolution with fused {post_op!r}")
    name = f"{node.name}_weight"
    gm.register_buffer(name, _constant(gm, packed).to_dense())
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(name)
    output_padding = [0] * len(padding)
    node.target = torch.ops.aten.convolution
    node.args = (x, weight, bias, stride, padding, dilation, False, output_padding, groups)


def scriptable_graph_module(lowered: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite a lowered int8 graph so that ``torch.jit.script`` accepts it and its file is self-contained.

    oneDNN calls become ``QConv``/``QConvAdd``/``QLinear`` submodules, quantize/dequantize become
    ``quantize_uint8``/``dequantize_uint8``, other ATen overloads their op packets; export's pytree input
    and output handling and its runtime guards are dropped (a single output is returned as is). ``lowered``'s
    graph is rewritten in place; the result holds only the attributes the new graph uses.
    """
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    gm, graph = lowered, lowered.graph
    graph._codegen = torch.fx.graph.CodeGen()
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.op != "call_function":
            continue
        elif node.target in ONEDNN_INT8_OPS:
            module, inputs = _runtime_module(gm, node)
            name = f"{'linear' if node.target is _QLINEAR else 'conv'}{count}"
            count += 1
            gm.add_submodule(name, module)
            with graph.inserting_before(node):
                new = graph.call_module(name, inputs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.target is quantize:
            x, scale, zero_point, quant_min, quant_max, dtype = node.args
            if dtype is not torch.uint8:
                raise NotImplementedError(f"quantize to {dtype}")
            node.target, node.args = quantize_uint8, (x, scale, zero_point, quant_min, quant_max)
        elif node.target is dequantize:
            node.target, node.args = dequantize_uint8, node.args[:3]
        elif node.target in _DROPPED:
            graph.erase_node(node)
        elif _packet(node.target) in _FLOAT_PACKED and node.target != getattr(_MKLDNN_CONV, "binary", None):
            _unpack_float_layer(gm, node)
        elif isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
        elif node.target is not operator.getitem:
            raise NotImplementedError(f"no TorchScript form for {node.target}")
    output = graph.output_node()
    outputs = output.args[0]
    if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
        output.args = (outputs[0],)
    graph.eliminate_dead_code()
    scriptable = torch.fx.GraphModule(gm, graph)
    _share_storage([m for m in scriptable.modules() if isinstance(m, (QConv, QConvAdd, QLinear))])
    return scriptable


def _share_storage(modules: list[nn.Module]) -> None:
    """Make the modules' weights views of one int8 storage, and their scales and biases of one float storage.

    TorchScript writes each storage as one archive record (~150 bytes of headers and alignment); sharing
    saves that per tensor, which matters for small models (ResNet-20: 66 records -> 2).
    """
    for names, dtype in ((("weight",), torch.int8), (("weight_scale", "bias"), torch.float32)):
        tensors = [(m, n, getattr(m, n)) for m in modules for n in names]
        flat = torch.cat([t.reshape(-1).to(dtype) for _, _, t in tensors]) if tensors else None
        offset = 0
        for module, name, tensor in tensors:
            setattr(module, name, flat[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()


def save_script(module: torch.jit.ScriptModule, path: str) -> None:
    """``torch.jit.save`` without its deprecation warning (see ``script_int8``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, path)


def load_script(path: str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation warning (see ``script_int8``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path)


def script_int8(lowered: torch.fx.GraphModule) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``scriptable_graph_module(lowered)`` in eval mode.

    TorchScript is deprecated in favour of ``torch.export``, but ``torch.export`` cannot save oneDNN's
    prepacked weights (see docs/int8_backend.md); the deprecation warnings of this call are silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
        return torch.jit.script(scriptable_graph_module(lowered).eval())
