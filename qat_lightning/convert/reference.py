"""The reference int8 program: an ``IntegerModel`` on ``torch.export``, quantize/dequantize where QAT quantized.

Each integer layer of the read-out becomes ``conv/linear(dequantize(quantize(x)), dequantize(codes))`` with the
standard PT2E quantize/dequantize ops (``quantized_decomposed``, what torchao's ``convert_pt2e`` writes and what
ONNX, ExecuTorch/XNNPACK and inductor lower to integer kernels); a ConvTranspose likewise, ``conv_transpose``. The
weight is stored once, as int8 codes with per-channel scales (along axis 1 of a ConvTranspose weight). A ``b < 8``-bit
input grid is an 8-bit quantize after a float ``clamp`` to the grid's range (quantizing is monotone, so this is
exactly the ``b``-bit rounding), which every runtime understands. Everything else stays float, as in QAT.

The ``plain_aten`` flavour writes the quantize/dequantize steps as ordinary ATen arithmetic (same numbers), so
that the saved ``.pt2`` file loads with ``torch.export.load`` in a process that has torch alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.convert.export import export_program
from qat_lightning.convert.readout import InputGrid, IntegerModel, plain_fake_quantize
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES
from qat_lightning.nn.fake_quantized import conv_transpose
from qat_lightning.quant.primitives import broadcast_along

_CONTAINER_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def qdq_ops():  # type: ignore[no-untyped-def]
    """``torch.ops.quantized_decomposed`` (registered by torchao's PT2E package, which imports torch's library)."""
    import torchao.quantization.pt2e  # noqa: F401 - registers the quantized_decomposed ops

    return torch.ops.quantized_decomposed


class QuantizeDequantize(nn.Module):
    """``x`` rounded to a trained per-tensor grid, written as the PT2E ``quantize -> dequantize`` pair.

    The grid's codes are shifted into the 8-bit container ``dtype`` (``uint8`` for x86 and ONNX Runtime, ``int8``
    for XNNPACK): ``(q - zp) * s == (q + k - (zp + k)) * s``. A grid narrower than the container is a float
    ``clamp`` to ``[(qmin - zp) * s, (qmax - zp) * s]`` first.
    """

    def __init__(self, grid: InputGrid, dtype: torch.dtype = torch.uint8, plain_aten: bool = False) -> None:
        super().__init__()
        self.plain_aten = plain_aten
        cmin, cmax = _CONTAINER_RANGE[dtype]
        shift = cmin - grid.quant_min if grid.quant_min < cmin or grid.quant_max > cmax else 0
        self.scale, self.zero_point, self.dtype = grid.scale, grid.zero_point + shift, dtype
        self.quant_min, self.quant_max = cmin, cmax
        narrow = (grid.quant_min + shift, grid.quant_max + shift) != (cmin, cmax)
        self.clip = (
            ((grid.quant_min - grid.zero_point) * grid.scale, (grid.quant_max - grid.zero_point) * grid.scale)
            if narrow
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = torch.clamp(x, *self.clip)
        if self.plain_aten:
            return plain_fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        args = (self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype)
        ops = qdq_ops()
        return ops.dequantize_per_tensor.default(ops.quantize_per_tensor.default(x, *args), *args)


class _IntegerWeightLayer(nn.Module):
    """Mixin of the reference layers: the weight is ``dequantize_per_channel(codes)``, the input on its grid
    (``input_grid``, or ``nn.Identity`` when the producer of the input rounds it)."""

    weight_codes: torch.Tensor
    weight_scale: torch.Tensor  # (C,); in plain ATen shaped to broadcast along the codes' channel axis
    weight_zero_point: torch.Tensor  # zeros (C,), a buffer as the lowerings expect; not in plain ATen
    input_grid: nn.Module
    plain_aten: bool
    weight_axis = 0  # the axis of the output channels, along which the scales run

    def dequantized_weight(self) -> torch.Tensor:
        if self.plain_aten:
            return self.weight_codes.to(torch.float32) * self.weight_scale
        args = (self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis, -128, 127, torch.int8)
        return qdq_ops().dequantize_per_channel.default(*args)


class _IntegerConv(_IntegerWeightLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_grid(input), self.dequantized_weight(), self.bias)  # type: ignore[attr-defined]


class _IntegerLinear(_IntegerWeightLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_grid(input), self.dequantized_weight(), self.bias)  # type: ignore[attr-defined]


class _IntegerConvTranspose(_IntegerWeightLayer):
    weight_axis = 1

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return conv_transpose(self, self.input_grid(input), self.dequantized_weight(), output_size)  # type: ignore[arg-type]


def _integer_class(float_class: type[nn.Module]) -> type[nn.Module]:
    mixin: type[_IntegerWeightLayer] = _IntegerConv
    if issubclass(float_class, nn.Linear):
        mixin = _IntegerLinear
    elif issubclass(float_class, CONV_TRANSPOSE_TYPES):
        mixin = _IntegerConvTranspose
    return type(f"Integer{float_class.__name__}", (mixin, float_class), {"__module__": __name__})


def reference_module(
    integer: IntegerModel, activation_dtype: torch.dtype = torch.uint8, plain_aten: bool = False
) -> nn.Module:
    """A copy of ``integer.model`` whose integer layers hold int8 codes and quantize their inputs (eager).

    An input shared at its producer's output is quantized there, once, for all its readers; so is each module
    output of ``integer.output_grids`` (a residual-add operand, a pool input).

    With ``plain_aten`` the quantize/dequantize steps are ordinary ATen arithmetic with the same numbers instead of
    the PT2E ops: a program of it loads with ``torch.export.load`` in a process that has torch alone.
    """
    module = copy.deepcopy(integer.model)
    for name, layer in integer.layers.items():
        target = module.get_submodule(name)
        del target.weight
        target.register_buffer("weight_codes", layer.codes.to(torch.int8).clone())
        scale = broadcast_along(layer.scale, layer.codes, layer.axis) if plain_aten else layer.scale
        target.register_buffer("weight_scale", scale.clone())
        if not plain_aten:
            target.register_buffer("weight_zero_point", torch.zeros(layer.scale.shape, dtype=torch.int64))
        target.plain_aten = plain_aten
        grid = QuantizeDequantize(layer.input, activation_dtype, plain_aten)
        target.input_grid = grid if layer.input_at is None else nn.Identity()
        if layer.input_at is not None:  # rounded once where it is made: every reader gets the same codes
            module.get_submodule(layer.input_at).round_output_with(grid)
        target.__class__ = _integer_class(type(target))
    for name, grid in integer.output_grids.items():  # the residual-add operands and pool inputs QAT rounds
        module.get_submodule(name).round_output_with(QuantizeDequantize(grid, activation_dtype, plain_aten))
    if not plain_aten:
        _round_max_pool_inputs(module)
    return module.eval()


def _round_max_pool_inputs(module: nn.Module) -> None:
    """Round the input of each max-pool whose output is rounded, on the same grid, in place.

    Rounding to a grid is monotone and max-pooling picks one of its inputs, so ``round(maxpool(x)) ==
    maxpool(round(x))`` and rounding that again changes nothing: the same numbers, but the kernel before the pool
    (a ResNet stem's conv) can write int8 codes and the pool run on them, as for NNCF's model (OpenVINO otherwise
    pools a bf16 copy of the stem's output and rounds it after).
    """
    for pool in list(module.modules()):
        rounding = pool.__dict__.get("output_quantizer")
        if isinstance(pool, nn.modules.pooling._MaxPoolNd) and isinstance(rounding, QuantizeDequantize):
            pool.input_rounding = rounding
            cls = type(pool)
            pool.__class__ = type(f"InputRounded{cls.__name__}", (_RoundsInput, cls), {"__module__": __name__})


class _RoundsInput(nn.Module):
    """Mixin of a module that rounds its input with ``input_rounding`` first."""

    input_rounding: nn.Module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_rounding(input))


class _FloatWeight(nn.Module):
    """Mixin for a reference layer that runs as a float kernel: its weight is the constant ``codes * scale``."""

    float_weight: torch.Tensor

    def dequantized_weight(self) -> torch.Tensor:
        return self.float_weight


def with_float_weights(module: nn.Module, layers: list[str]) -> nn.Module:
    """Give each of ``layers`` of a ``reference_module`` its weight as a float constant (the same numbers), in
    place, for runtimes that cannot run them on int8 weights; their inputs stay on their grids."""
    for name in layers:
        target = module.get_submodule(name)
        weight = target.dequantized_weight()  # codes * scale along the layer's channel axis
        del target.weight_codes
        target.register_buffer("float_weight", weight)
        cls = type(target)
        target.__class__ = type(f"Float{cls.__name__}", (_FloatWeight, cls), {"__module__": __name__})
    return module


def reference_program(
    integer: IntegerModel,
    example_inputs: tuple[torch.Tensor, ...],
    activation_dtype: torch.dtype = torch.uint8,
    plain_aten: bool = False,
) -> torch.export.ExportedProgram:
    """The reference int8 program of ``integer`` (dynamic batch dimension where the model allows it).

    A dequantize read by several ops (a shared input grid) is copied for each reader, as ``convert_pt2e`` does, so
    that every integer kernel's pattern (``dequantize -> conv``) is its own for the lowerings that fuse it.
    """
    program = export_program(reference_module(integer, activation_dtype, plain_aten), example_inputs)
    return program if plain_aten else with_dequantize_per_reader(program)


def with_dequantize_per_reader(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` (changed in place) with each PT2E dequantize read by several ops copied for each reader."""
    from torchao.quantization.pt2e.quantizer import DuplicateDQPass

    DuplicateDQPass()(program.graph_module)
    return program


class ReferenceSource:
    """What every backend builds from: the integer read-out, example inputs, and its reference programs.

    ``program(dtype, fold_batchnorm)`` exports each flavour of the reference program once and caches it, so the
    backends that share a flavour share one program.
    """

    def __init__(self, integer: IntegerModel, example_inputs: tuple[torch.Tensor, ...]) -> None:
        self.integer = integer
        self.example_inputs = tuple(example_inputs)
        self._programs: dict[tuple[torch.dtype, bool, bool], torch.export.ExportedProgram] = {}
        self._folded: IntegerModel | None = None

    def folded(self) -> IntegerModel:
        """``integer.folded(example_inputs)``, computed once (it exports the model to find the BatchNorm pairs)."""
        if self._folded is None:
            self._folded = self.integer.folded(self.example_inputs)
        return self._folded

    def program(
        self, activation_dtype: torch.dtype = torch.uint8, fold_batchnorm: bool = False, plain_aten: bool = False
    ) -> torch.export.ExportedProgram:
        """The reference program with ``activation_dtype`` codes; BatchNorm folded into the integer layers or not.

        Unfolded, it computes operation for operation what the fake-quant model computes (the ``.pt2`` and ONNX
        files, whose runtimes fold it themselves); folded, integer kernels can run each layer with its BatchNorm.
        ``plain_aten``: see ``reference_module``.
        """
        key = (activation_dtype, fold_batchnorm, plain_aten)
        if key not in self._programs:
            integer = self.folded() if fold_batchnorm else self.integer
            self._programs[key] = reference_program(integer, self.example_inputs, activation_dtype, plain_aten)
        return self._programs[key]
