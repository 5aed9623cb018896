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

One difference stays on the int8 layers: XNNPACK rounds the float bias to ``input scale * weight scale`` (int32).
Codes narrower than 8 bits are shifted left into the int8 range (scale divided by the same power of two: the same
weights) to make that step finer, but on 8-bit weights a network can be sensitive enough for it to move the logits
by a percent (a randomly initialised ResNet-20 is). So the int8 layers are kept only if the program stays within
``INT8_RELATIVE_ERROR`` of the reference program on the example inputs; otherwise every layer runs as a float
kernel on its trained input grid. The log says which layers run on int8.

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
from torch import nn

from qat_lightning.convert.fidelity import relative_error
from qat_lightning.convert.readout import InputGrid
from qat_lightning.convert.reference import (
    ReferenceSource,
    qdq_ops,
    reference_module,
    with_dequantize_per_reader,
    with_float_weights,
)

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
    return with_dequantize_per_reader(program)


def _reference_module(source: ReferenceSource) -> nn.Module:
    """The folded int8 reference module, with the input of each transposed convolution and each output rounding
    (residual-add operands, pool inputs) rounded by plain arithmetic (the same numbers): XNNPACK takes a transposed
    convolution, an add or a pool of a dequantized input only with an int8 output, which QAT does not give it, so
    they run as float kernels."""
    integer = source.folded()
    module = reference_module(integer, torch.int8)
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvTransposeNd) and hasattr(layer, "input_grid"):
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


def _lower(source: ReferenceSource, int8: list[str]) -> bytes:
    """The ``.pte`` bytes of ``source`` with ``int8`` on XNNPACK's int8 kernels and its other layers on float ones."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    integer = source.folded()
    module = _reference_module(source)
    with_float_weights(module, [n for n in integer.layers if n not in int8])
    _finest_codes(module, int8)
    program = _export(module, source.example_inputs)
    _insert_output_quantize(program, int8)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _relative_error(program: bytes, inputs: tuple[torch.Tensor, ...], expected: torch.Tensor) -> float:
    return relative_error(_runner(program)(*inputs), expected)


def lowered_program(source: ReferenceSource) -> tuple[bytes, list[str], float]:
    """The ``.pte`` bytes, the layers XNNPACK runs on int8, and the relative error on the example inputs.

    The int8 candidates are tried first and kept if they stay within ``INT8_RELATIVE_ERROR`` of the reference;
    otherwise every layer runs as a float kernel.
    """
    reference = _export(_reference_module(source), source.example_inputs)
    with torch.no_grad():
        expected = reference.module()(*source.example_inputs)
    candidates = _int8_outputs(reference)
    if candidates:
        try:
            program = _lower(source, candidates)
            error = _relative_error(program, source.example_inputs, expected)
        except RuntimeError as failure:  # XNNPACK refuses some mixes of int8 and float kernels, to lower or to run
            log.info("executorch: XNNPACK cannot run %s on int8 kernels (%s); float ones instead", candidates, failure)
        else:
            if error <= INT8_RELATIVE_ERROR:
                return program, candidates, error
            log.info(
                "executorch: int8 kernels for %s differ by %.4f from the reference (their int32 bias rounding); "
                "every layer runs as a float kernel",
                candidates,
                error,
            )
    program = _lower(source, [])
    return program, [], _relative_error(program, source.example_inputs, expected)


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

    method = Runtime.get().load_program(program).load_method("forward")

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        return method.execute([x.contiguous() for x in inputs])[0].clone()

    return run


def load(path: Path) -> Callable[..., torch.Tensor]:
    return _runner(Path(path))
