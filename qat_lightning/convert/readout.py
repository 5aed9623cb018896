"""The integer read-out of a trained fake-quant model: the one place every artifact is built from.

``integer_model(model)`` reads each fake-quantized layer once (weight codes, per-channel scales, its input grid)
and returns an ``IntegerModel``: a float copy of the model whose integer layers compute ``codes * scale`` on
inputs rounded to their trained grid, plus the records the backends write. ``IntegerModel.folded(example_inputs)``
folds BatchNorm into the layers that feed it (codes keep their magnitude, scales absorb
``|gamma / sqrt(var + eps)|``) for the backends whose integer kernels need it. Nothing else in the model is
quantized, exactly as in QAT (residual adds, concatenations and pooling stay float, and read the rounded tensor
where QAT shares an input quantizer at its producer's output), so every artifact computes what the validated
model computed.

Layers that no integer kernel can run (weights or inputs wider than 8 bits, float inputs, a scheme other than
symmetric weights and per-tensor inputs) stay float in the artifacts: their weights keep their grid values and
their inputs their trained fake quantization (``FrozenInputGrid``), so they also compute what was trained. So does
the in-projection of a fake-quantized ``MultiheadAttention`` (``ATTENTION_REASON``); its ``out_proj`` is a Linear.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from qat_lightning.convert.bn_folding import find_batchnorm_pairs, fold_batchnorms
from qat_lightning.convert.export import export_program
from qat_lightning.nn import (
    FakeQuantizedLayer,
    FakeQuantizedModule,
    FakeQuantizedMultiheadAttention,
    fake_quantized_layers,
    restore_float_layer,
    weight_channel_axis,
)
from qat_lightning.nn.input_sharing import rounded_producers
from qat_lightning.nn.output_rounding import drop_output_quantizers, output_roundings
from qat_lightning.quant import FakeQuantizer, quant_range
from qat_lightning.quant.primitives import EPS, broadcast_along

INTEGER_MAX_BITS = 8
ATTENTION_REASON = "attention: its in-projection runs in float on the trained grids (its out_proj is its own layer)"


@dataclass(frozen=True)
class InputGrid:
    """A per-tensor affine grid: ``x = (q - zero_point) * scale`` with ``q`` in ``quant_min..quant_max``."""

    scale: float
    zero_point: int
    bits: int
    symmetric: bool = False

    @property
    def quant_min(self) -> int:
        return quant_range(self.bits, self.symmetric)[0]

    @property
    def quant_max(self) -> int:
        return quant_range(self.bits, self.symmetric)[1]

    @classmethod
    def of(cls, quantizer: FakeQuantizer) -> InputGrid:
        """The grid a per-tensor quantizer uses now (its scale clamped as its forward pass clamps it)."""
        scale = float(quantizer.scale.detach().clamp(min=EPS))
        return cls(scale, int(quantizer.zero_point), quantizer.config.bits, quantizer.config.symmetric)


@dataclass(frozen=True)
class IntegerLayer:
    """The integer form of one trained layer: ``weight = codes * scale`` and the grid of its input.

    Attributes:
        name: qualified module name.
        codes: integer weight codes, int8 (int32 above 8 bits), shape of the weight.
        scale: per-output-channel weight scale, float32, shape ``(C,)`` along ``axis`` (a per-tensor scale is
            repeated).
        bits: weight bit width (codes lie in ``-2**(bits-1) .. 2**(bits-1) - 1``).
        input: the trained grid of the layer input (``None``: float input, for a layer that stays float).
        axis: the weight axis of the output channels (1 for ConvTranspose, see ``weight_channel_axis``).
        input_at: the module at whose output that grid is applied, shared with the other layers reading it
            (``qat_lightning.nn.input_sharing``); ``None``: at the layer's own input.
    """

    name: str
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    input: InputGrid | None
    axis: int = 0
    input_at: str | None = None

    def weight(self) -> torch.Tensor:
        """``codes * scale`` (float32), exactly the weight the fake-quant layer used (after any fold)."""
        return self.codes.float() * broadcast_along(self.scale, self.codes, self.axis)

    def folded(self, factor: torch.Tensor) -> IntegerLayer:
        """The same layer after BatchNorm folding with per-channel ``factor`` (see ``batchnorm_factor``).

        Codes keep their magnitude (their sign flips where ``factor < 0``) and scales become
        ``scale * |factor|``, so ``folded.weight() == weight() * factor`` on the same grid. Only a code of -128
        that flips to +128 leaves the int8 container and is clamped to 127 (one step on one weight); a ``b < 8``-bit
        code may end one step past its grid's positive end, which the int8 kernels compute exactly. Channels with
        ``factor == 0`` become zero.
        """
        sign = broadcast_along(torch.sign(factor).to(torch.int32), self.codes, self.axis)
        codes = self.codes.to(torch.int32) * sign
        if self.codes.dtype == torch.int8:
            codes = torch.clamp(codes, -128, 127)
        codes = codes.to(self.codes.dtype)
        scale = torch.where(factor == 0, self.scale, self.scale * factor.abs())
        return dataclasses.replace(self, codes=codes, scale=scale)


def integer_unsupported_reason(layer: FakeQuantizedLayer) -> str | None:
    """Why no integer kernel can run ``layer`` (``None`` if one can)."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if wq.config.bits > INTEGER_MAX_BITS:
        return f"{wq.config.bits}-bit weights (integer kernels take at most 8)"
    if not isinstance(iq, FakeQuantizer):
        return "float inputs (no input quantizer)"
    if iq.config.bits > INTEGER_MAX_BITS:
        return f"{iq.config.bits}-bit inputs (integer kernels take at most 8)"
    if not (wq.calibrated and iq.calibrated):
        return (
            "its quantizers never saw data: the layer was not called in training, e.g. the model reads its weight "
            "directly, as `F.linear(x, layer.weight)` in torchvision's Swin attention"
        )
    if not wq.config.symmetric or iq.config.per_channel:
        return "a scheme other than symmetric weights and per-tensor inputs"
    return None


def read_layer(name: str, layer: FakeQuantizedLayer) -> IntegerLayer:
    """Read the integer form of a fake-quantized layer (the grids its forward pass uses now).

    The codes are read off the fake-quantized weight itself, so they follow the fake-quant kernel's rounding
    (``x * (1 / scale)``) also where ``x / scale`` lands on a tie, as each channel's extreme weight does. Codes
    are int8 up to 8 bits, int32 above; ``input`` is ``None`` when the layer input is float or never observed.
    """
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    grid_weight = layer.quantized_weight().detach().float()
    axis = weight_channel_axis(layer)
    scale = wq.scale.detach().float().clamp(min=EPS).expand(grid_weight.shape[axis]).clone()
    codes = torch.round(grid_weight / broadcast_along(scale, grid_weight, axis))
    dtype = torch.int8 if wq.config.bits <= INTEGER_MAX_BITS else torch.int32
    grid = InputGrid.of(iq) if isinstance(iq, FakeQuantizer) and iq.calibrated else None
    producer = iq.producer if isinstance(iq, FakeQuantizer) else None
    return IntegerLayer(name, codes.to(dtype), scale, wq.config.bits, grid, axis=axis, input_at=producer)


def plain_fake_quantize(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """Per-tensor fake quantization in 4 plain ATen ops, the numbers of the fake-quant kernel and of the PT2E
    ``quantize -> dequantize`` pair: ``(clamp(round(x * (1 / s)) + zp, qmin, qmax) - zp) * s`` equals
    ``clamp(round(x * (1 / s)), qmin - zp, qmax - zp) * s`` (integer-valued floats: adding and removing ``zp`` is
    exact)."""
    return torch.clamp(torch.round(x * (1.0 / scale)), quant_min - zero_point, quant_max - zero_point) * scale


class FrozenInputGrid(nn.Module):
    """A trained per-tensor input quantizer as plain ATen arithmetic (exportable, same rounding as training,
    ``plain_fake_quantize``); used for layers that stay float so that they still see their trained grid."""

    def __init__(self, grid: InputGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        return plain_fake_quantize(x, g.scale, g.zero_point, g.quant_min, g.quant_max)


@dataclass
class IntegerModel:
    """A trained fake-quant model read out in integer form.

    Attributes:
        model: float copy in eval mode. Each layer of ``layers`` is a plain float layer whose weight is
            ``codes * scale`` (its input still float: the reference program puts the grid in front of it); the
            layers of ``float_layers`` keep their grid weights and a ``FrozenInputGrid`` on their input. BatchNorm
            is folded into the layers before it where ``batchnorm_pairs`` is empty (see ``folded``).
        layers: the integer layers of ``model``.
        float_layers: ``{name: reason}`` of the fake-quantized layers that stay float.
        weight_codes: the trained weight codes of every layer that has them (integer layers and float layers on
            a symmetric grid, before any fold): the weights of the float architecture, for the packed file.
        output_grids: ``{module: grid}`` of the module outputs QAT rounds though no layer reads them (residual-add
            operands, pool inputs; ``qat_lightning.nn.output_rounding``); ``model`` rounds them in float.
    """

    model: nn.Module
    layers: dict[str, IntegerLayer]
    float_layers: dict[str, str]
    weight_codes: dict[str, IntegerLayer]
    output_grids: dict[str, InputGrid] = dataclasses.field(default_factory=dict)

    def folded(self, example_inputs: tuple[torch.Tensor, ...]) -> IntegerModel:
        """A copy with BatchNorm folded into the Conv/Linear layers that feed it (``IntegerLayer.folded``).

        The pairs are read off the exported graph of ``model`` run on ``example_inputs`` (the real data flow, not
        the module order). Integer kernels need the fold; the unfolded form computes, operation for operation,
        what the fake-quant model computes in eval mode.
        """
        model = copy.deepcopy(self.model)
        factors = fold_batchnorms(model, find_batchnorm_pairs(export_program(model, example_inputs).graph))
        layers = {n: layer.folded(factors[n]) if n in factors else layer for n, layer in self.layers.items()}
        for name, layer in layers.items():
            model.get_submodule(name).weight = nn.Parameter(layer.weight(), requires_grad=False)
        return dataclasses.replace(self, model=model, layers=layers)


@torch.no_grad()
def integer_model(model: nn.Module) -> IntegerModel:
    """Read a trained fake-quant ``model`` (left untouched) out as an ``IntegerModel`` (BatchNorm not folded yet).

    Args:
        model: a model whose layers were fake-quantized (``QuantizationCallback``, ``apply_plan``), on the CPU.
    """
    copy_ = copy.deepcopy(model).eval()
    layers, codes, float_layers = {}, {}, {}
    for name, layer in list(fake_quantized_layers(copy_)):
        reason = integer_unsupported_reason(layer)
        if reason is None:
            layers[name] = codes[name] = read_layer(name, layer)
            restore_float_layer(layer)
            layer.weight = nn.Parameter(layers[name].weight(), requires_grad=False)
            continue
        float_layers[name] = reason
        if layer.weight_quantizer.calibrated and layer.weight_quantizer.config.symmetric:
            codes[name] = read_layer(name, layer)
        _freeze_grids(layer)
    for name, module in list(copy_.named_modules()):
        if isinstance(module, FakeQuantizedMultiheadAttention):
            float_layers[name] = ATTENTION_REASON
            _freeze_grids(module)
    # Output roundings (``output_rounding``: no layer reads them) go to the int8 runtimes as quantized tensors.
    output_grids = {n: InputGrid.of(q) for n, q in output_roundings(copy_).items() if q.calibrated}
    output_grids = {n: grid for n, grid in output_grids.items() if grid.bits <= INTEGER_MAX_BITS}
    drop_output_quantizers(copy_)  # their grids are applied below, like the shared input grids
    for producer in rounded_producers(copy_).values():  # shared input grids, applied where the input is made
        q = producer.output_quantizer
        producer.round_output_with(FrozenInputGrid(InputGrid.of(q)) if q.calibrated else nn.Identity())
    return IntegerModel(copy_, layers, float_layers, codes, output_grids)


def _freeze_grids(module: FakeQuantizedModule) -> None:
    """Keep ``module`` float on its trained grids: its weights become their grid values, its inputs get a
    ``FrozenInputGrid`` (``nn.Identity`` for a quantizer that never saw data) and no quantizer is left."""
    for name, grid in module.quantized_weights().items():
        setattr(module, name, nn.Parameter(grid.detach(), requires_grad=False))
        setattr(module, f"{name}_quantizer", nn.Identity())
    for name, quantizer in module.input_quantizers().items():
        if isinstance(quantizer, FakeQuantizer):  # a grid shared at the producer's output is applied there
            rounds_here = quantizer.calibrated and quantizer.producer is None
            frozen = FrozenInputGrid(InputGrid.of(quantizer)) if rounds_here else nn.Identity()
            setattr(module, f"{name}_quantizer", frozen)
