"""``<name>_int8.pte``: the reference int8 program lowered to ExecuTorch's XNNPACK delegate.

XNNPACK runs a convolution or linear layer on int8 only as ``dequantize -> conv -> [relu] -> quantize``: it needs a
quantized output, which QAT never had (the fake-quant model rounds layer inputs, not outputs). A layer gets one here
only where that rounding is already there: its output reaches, through ops that commute with rounding to a grid
(ReLU, clamps, max-pooling, reshapes), exactly one consumer, the input quantize of the next integer layer. Then
``quantize(relu(conv))`` on that trained grid is what the fake-quant model computed anyway, and a
``quantize -> dequantize`` pair is inserted after the layer (and after each commuting op down to that consumer, so
that XNNPACK keeps them on int8 too). Every other integer layer (a layer feeding a residual add, average pooling, or
the logits) keeps its input rounded to its trained grid but runs as an XNNPACK float kernel on the float weights
``codes * scale``, so the file computes what the fake-quant model computed, layer for layer; those layers are
stored as float32, the int8 ones as int8 codes.

A tensor rounded once where it is made and read by several ops (a residual skip and the next block's first
convolution) gets one dequantize per reader, so that an int8 convolution reads it as int8 while the float residual
add reads it as float. The add itself stays float: one of its inputs, the block's last convolution, was never
rounded in QAT. On a ResNet the first convolution of each block (and the stem) can thus run on int8.

One difference stays on the int8 layers: XNNPACK rounds the float bias to ``input scale * weight scale`` (int32).
Codes narrower than 8 bits are shifted left into the int8 range (scale divided by the same power of two: the same
weights) to make that step finer, but on 8-bit weights a network can be sensitive enough for it to move the logits
by a percent per layer (a randomly initialised ResNet-20 with randomised BatchNorm statistics is). That rounding is
simulated in eager mode on the example inputs: layers whose rounding moves the output by more than what the
float-kernel program's own error leaves of ``INT8_RELATIVE_ERROR`` (alone, or added to those already chosen) run as
float kernels. The int8 layers chosen are kept only if the program stays within ``INT8_RELATIVE_ERROR`` of the
reference program on the example inputs; otherwise every layer runs as a float kernel on its trained input grid.
The log says which layers run on int8.

A float-kernel ``Conv1d`` is written as a 2-D convolution over an axis of size 1 (XNNPACK would take its dequantized
input for an int8 one); an int8 ``Conv1d`` is lowered as XNNPACK's own 1-D int8 convolution.

The program is exported with its batch dimension bounded by ``max(64, example batch)`` (memory is planned for the
bound) and checked against the reference program on the example inputs before it is written; a program that
computes something else is refused with a ``RuntimeError`` that says why. Load it with
``executorch.runtime.Runtime.get().load_program(path)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.convert.fidelity import relative_error
from qat_lightning.convert.readout import InputGrid
from qat_lightning.convert.reference import (
    ReferenceSource,
    qdq_ops,
    reference_module,
    with_float_weights,
)
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES

NAME = "executorch"
FILE_NAME = "{name}_int8.pte"
LOAD_HINT = "executorch.runtime.Runtime.get().load_program('{path}')"  # how a user runs the file, shown at fit end
log = logging.getLogger(__name__)
MAX_RELATIVE_ERROR = 0.01  # of the file's output against the reference program on the example inputs
INT8_RELATIVE_ERROR = 0.005  # the int8 kernels are kept within this, else every layer runs as a float kernel
MIN_MAX_BATCH = 64  # the .pte runs any batch up to max(MIN_MAX_BATCH, example batch)

_aten = torch.ops.aten
_GEMMS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.linear.default}
_FUSED = {_aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default}
# Ops f with round(f(round(x))) == round(f(x)) on any grid that holds 0 (monotone, and max-like or clamping).
_COMMUTING = _FUSED | {
    _aten.clamp.default,
    _aten.clamp_.default,
    _aten.max_pool1d.default,
    _aten.max_pool2d.default,
    _aten.max_pool3d.default,
    _aten.view.default,
    _aten.reshape.default,
    _aten.flatten.using_ints,
}


def requirement() -> str | None:
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError:
        return "`pip install executorch`"
    return None


def _gemm_layers(program: torch.export.ExportedProgram) -> dict[str, torch.fx.Node]:
    """``{layer name: conv/linear node}`` of the layers whose weight is ``dequantize_per_channel(codes)``."""
    buffers = program.graph_signature.inputs_to_buffers
    layers = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in _GEMMS:
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.target == qdq_ops().dequantize_per_channel.default:
                name = buffers.get(weight.args[0].name, "")
                if name.endswith(".weight_codes"):
                    layers[name.removesuffix(".weight_codes")] = node
    return layers


def _output_chain(gemm: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """The commuting ops from ``gemm`` to the one input quantize its output reaches, and that quantize; else None."""
    chain, node = [], gemm
    while len(node.users) == 1:
        (user,) = node.users
        if user.target == qdq_ops().quantize_per_tensor.default:
            return chain, user
        if user.target not in _COMMUTING or user.args[0] is not node:
            return None
        chain.append(user)
        node = user
    return None


def _int8_outputs(program: torch.export.ExportedProgram) -> list[str]:
    """The layers whose output may be quantized exactly (see the module docstring)."""
    return [name for name, gemm in _gemm_layers(program).items() if _output_chain(gemm) is not None]


def _insert_output_quantize(program: torch.export.ExportedProgram, layers: list[str]) -> None:
    """Put ``quantize -> dequantize`` on the next layer's grid after each of ``layers`` and its commuting ops."""
    qdq = qdq_ops()
    graph = program.graph
    for name, gemm in _gemm_layers(program).items():
        if name not in layers:
            continue
        found = _output_chain(gemm)
        assert found is not None
        chain, quantize = found
        grid = quantize.args[1:]
        heads = chain[1:] if chain and chain[0].target in _FUSED else chain
        for node in [chain[0] if chain and chain[0].target in _FUSED else gemm, *heads]:
            (user,) = node.users
            if user is quantize:
                continue
            with graph.inserting_after(node):
                q = graph.call_function(qdq.quantize_per_tensor.default, (node, *grid))
                q.meta["val"] = node.meta["val"].to(grid[-1])
            with graph.inserting_after(q):
                dq = graph.call_function(qdq.dequantize_per_tensor.default, (q, *grid))
                dq.meta["val"] = node.meta["val"]
            user.replace_input_with(node, dq)
    program.graph_module.recompile()


def _finest_codes(module: nn.Module, layers: list[str]) -> nn.Module:
    """Scale each channel's codes by the largest power of two that keeps them int8, and its scale down by it.

    The weights are the same numbers; XNNPACK rounds the bias to ``input scale * weight scale``, which gets finer.
    """
    for name in layers:
        target = module.get_submodule(name)
        codes = target.weight_codes.to(torch.int32)
        peak = codes.abs().flatten(1).amax(1).clamp(min=1)
        factor = torch.pow(2.0, torch.floor(torch.log2(127.0 / peak.float()))).clamp(min=1)
        shape = (-1,) + (1,) * (codes.dim() - 1)
        target.weight_codes = (codes * factor.to(torch.int32).reshape(shape)).to(torch.int8)
        target.weight_scale = target.weight_scale / factor
    return module


def _export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``module`` exported at its largest batch, the batch dimension dynamic up to it (static if it must be)."""
    batch = len(example_inputs[0]) if example_inputs and example_inputs[0].dim() else 1
    largest = max(MIN_MAX_BATCH, batch)
    inputs = tuple(x.repeat_interleave(-(-largest // len(x)), 0)[:largest] if x.dim() else x for x in example_inputs)
    dim = torch.export.Dim("batch", min=1, max=largest)
    shapes = tuple({0: dim} if x.dim() else None for x in inputs)
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=shapes)
    except Exception:  # noqa: BLE001 - a model that needs a fixed batch takes the example batch only
        program = torch.export.export(module, example_inputs)
    return _dequantize_per_reader(program)


def _dequantize_per_reader(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` (changed in place) with each per-tensor dequantize read by several ops copied for each reader.

    A tensor rounded where it is made (a shared input grid) is one ``quantize -> dequantize`` read by, say, an int8
    convolution and a float residual add; XNNPACK takes a dequantize inside an int8 kernel's pattern as that
    kernel's int8 input, so a float reader needs its own (torchao's ``DuplicateDQPass`` copies only for readers
    that carry a quantization annotation, which this program has none of).
    """
    graph = program.graph
    for node in list(graph.nodes):
        if node.target == qdq_ops().dequantize_per_tensor.default and len(node.users) > 1:
            for user in list(node.users)[1:]:
                with graph.inserting_after(node):
                    copy = graph.node_copy(node)
                user.replace_input_with(node, copy)
    program.graph_module.recompile()
    return program


def _reference_module(source: ReferenceSource) -> nn.Module:
    """The folded int8 reference module, with the input of each transposed convolution and each output rounding
    (residual-add operands, pool inputs) rounded by plain arithmetic (the same numbers): XNNPACK takes a transposed
    convolution, an add or a pool of a dequantized input only with an int8 output, which QAT does not give it, so
    they run as float kernels."""
    integer = source.folded()
    module = reference_module(integer, torch.int8)
    for layer in module.modules():
        if isinstance(layer, CONV_TRANSPOSE_TYPES) and hasattr(layer, "input_grid"):
            layer.input_grid.plain_aten = True
    for name, grid in integer.output_grids.items():  # XNNPACK's int8 add and pooling need int8 outputs
        module.get_submodule(name).round_output_with(_RoundingWithoutRound(grid))
    return module


class _RoundingWithoutRound(nn.Module):
    """``plain_fake_quantize`` on ``grid`` with ``torch.round`` written as ``(y + M) - M``, ``M = 1.5 * 2**23``.

    XNNPACK's delegate fails to run a ``round`` between its float kernels of a residual branch (ExecuTorch 1.5:
    "Propagating input shapes failed"). In float32, ``(y + M) - M`` is ``y`` rounded to the nearest integer, ties to
    even, as ``torch.round``, for ``|y| < 2**22``; the clamp to the grid's integer bounds comes first (rounding and
    clamping to integers commute), so ``|y| <= 255``: the same numbers.
    """

    MAGIC = 1.5 * 2**23

    def __init__(self, grid: InputGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        y = torch.clamp(x * (1.0 / g.scale), g.quant_min - g.zero_point, g.quant_max - g.zero_point)
        return ((y + self.MAGIC) - self.MAGIC) * g.scale


def signal_padding(conv: nn.Conv1d) -> tuple[int, int]:
    """``(left, right)``: the elements ``conv`` pads its signal with on each side, as its own forward pads it (a
    number or ``"valid"``: the same on both sides; ``"same"``: ``dilation * (kernel_size - 1)`` in all, the odd one
    on the right)."""
    if conv.padding == "same":
        total = conv.dilation[0] * (conv.kernel_size[0] - 1)
        return total // 2, total - total // 2
    pad = 0 if conv.padding == "valid" else conv.padding[0]
    return pad, pad


class _Conv1dAs2d(nn.Module):
    """Mixin for a float-kernel ``Conv1d`` of the lowering module: the same convolution written as a 2-D one over a
    trailing axis of size 1, its weight stored 4-D (``float_weight``, ``(C_out, C_in / groups, K, 1)``).

    XNNPACK rewrites every 1-D convolution into a 2-D one itself and, doing so, takes a dequantized input as an int8
    input, which fails without int8 weights ("Weight and Input should both be quantized"); a 2-D convolution of a
    dequantized input runs as a float kernel, as the other float layers do.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv: nn.Conv1d = self  # type: ignore[assignment]
        padding: str | tuple[int, ...] = conv.padding if isinstance(conv.padding, str) else (*conv.padding, 0)
        if conv.padding_mode != "zeros":
            input = F.pad(input, signal_padding(conv), mode=conv.padding_mode)
            padding = (0, 0)
        stride, dilation = (*conv.stride, 1), (*conv.dilation, 1)
        return F.conv2d(input.unsqueeze(-1), weight, bias, stride, padding, dilation, conv.groups).squeeze(-1)


def _lowering_module(source: ReferenceSource, int8: list[str]) -> nn.Module:
    """The folded reference module with ``int8`` on int8 weights (finest codes, see ``_finest_codes``) and its other
    integer layers on float weights (the same numbers), float ``Conv1d`` layers written as 2-D ones."""
    module = _reference_module(source)
    floats = [n for n in source.folded().layers if n not in int8]
    with_float_weights(module, floats)
    for name in floats:
        layer = module.get_submodule(name)
        if isinstance(layer, nn.Conv1d):
            layer.float_weight = layer.float_weight.unsqueeze(-1)
            cls = type(layer)
            layer.__class__ = type(f"As2d{cls.__name__}", (_Conv1dAs2d, cls), {"__module__": __name__})
    return _finest_codes(module, int8)


def _lower(source: ReferenceSource, int8: list[str]) -> bytes:
    """The ``.pte`` bytes of ``source`` with ``int8`` on XNNPACK's int8 kernels and its other layers on float ones."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = _export(_lowering_module(source, int8), source.example_inputs)
    _insert_output_quantize(program, int8)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _relative_error(program: bytes, inputs: tuple[torch.Tensor, ...], expected: torch.Tensor) -> float:
    return relative_error(_runner(program)(*inputs), expected)


@torch.no_grad()
def _bias_rounding_tolerated(source: ReferenceSource, candidates: list[str], budget: float) -> list[str]:
    """The ``candidates`` whose int32 bias rounding moves the output by at most ``budget`` (relative) together.

    XNNPACK stores an int8 layer's bias as ``round(bias / (input scale * weight scale))``, a rounding QAT never
    made. It is simulated here in eager mode on the example inputs (the lowering module with those biases rounded,
    against the same module unrounded): first each layer alone, then the layers, least disturbing first, added one
    by one while the output of them all together stays within the budget.
    """
    module = _lowering_module(source, candidates)
    integer = source.folded()
    exact, rounded = {}, {}
    for name in candidates:
        layer = module.get_submodule(name)
        if layer.bias is not None:
            unit = layer.weight_scale.double() * integer.layers[name].input.scale  # type: ignore[union-attr]
            exact[name] = layer.bias.detach().clone()
            rounded[name] = (torch.round(exact[name].double() / unit) * unit).float()
    expected = module(*source.example_inputs)

    def error(layers: list[str]) -> float:
        for name in exact:
            module.get_submodule(name).bias.copy_(rounded[name] if name in layers else exact[name])
        return relative_error(module(*source.example_inputs), expected)

    alone = {name: error([name]) if name in exact else 0.0 for name in candidates}
    chosen: list[str] = []
    for name in sorted(candidates, key=alone.__getitem__):
        if alone[name] <= budget and error([*chosen, name]) <= budget:
            chosen.append(name)
    return [name for name in candidates if name in chosen]


def lowered_program(source: ReferenceSource) -> tuple[bytes, list[str], float]:
    """The ``.pte`` bytes, the layers XNNPACK runs on int8, and the relative error on the example inputs.

    The program on float kernels is lowered first: it is the fallback, and its error is what the int8 layers'
    bias rounding adds to. The int8 candidates whose rounding stays within what it leaves of
    ``INT8_RELATIVE_ERROR`` (``_bias_rounding_tolerated``) are lowered next and kept if that program stays within
    ``INT8_RELATIVE_ERROR`` of the reference; otherwise every layer runs as a float kernel.
    """
    reference = _export(_reference_module(source), source.example_inputs)
    with torch.no_grad():
        expected = reference.module()(*source.example_inputs)
    fallback = _lower(source, [])
    float_error = _relative_error(fallback, source.example_inputs, expected)
    candidates = _int8_outputs(reference)
    budget = INT8_RELATIVE_ERROR - float_error
    int8 = _bias_rounding_tolerated(source, candidates, budget) if candidates and budget > 0 else []
    if len(int8) < len(candidates):
        log.info(
            "executorch: %s stay float kernels: XNNPACK's int32 bias rounding on them would move the output by more "
            "than %.4f (the float kernels are %.4f off already)",
            [n for n in candidates if n not in int8],
            budget,
            float_error,
        )
    if int8:
        try:
            program = _lower(source, int8)
            error = _relative_error(program, source.example_inputs, expected)
        except RuntimeError as failure:  # XNNPACK refuses some mixes of int8 and float kernels, to lower or to run
            log.info("executorch: XNNPACK cannot run %s on int8 kernels (%s); float ones instead", int8, failure)
        else:
            if error <= INT8_RELATIVE_ERROR:
                return program, int8, error
            log.info(
                "executorch: int8 kernels for %s differ by %.4f from the reference; every layer runs as a float kernel",
                int8,
                error,
            )
    return fallback, [], float_error


def write(source: ReferenceSource, path: Path) -> None:
    program, int8, error = lowered_program(source)
    if error > MAX_RELATIVE_ERROR:
        raise RuntimeError(
            f"the ExecuTorch program computes something else than the int8 program (relative error {error:.3f} on "
            "the example inputs); use the 'onnx' or 'pt2' formats for this model"
        )
    log.info("executorch: XNNPACK int8 layers %s, the others float (relative error %.5f)", int8, error)
    Path(path).write_bytes(program)


def _runner(program: Path | bytes) -> Callable[..., torch.Tensor]:
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program)  # holds the bytes and the program the method runs in
    method = loaded.load_method("forward")

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        assert loaded is not None  # the closure keeps the program alive: a method outliving it crashes
        return method.execute([x.contiguous() for x in inputs])[0].clone()

    return run


def load(path: Path) -> Callable[..., torch.Tensor]:
    return _runner(Path(path))
