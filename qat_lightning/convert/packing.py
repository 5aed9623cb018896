"""Packed low-bit weight files: ``8 // bits`` weight codes per byte, plus scales.

``pack_codes``/``unpack_codes`` are the pure bit packing. ``save_packed_weights`` writes a trained fake-quant
model's weights in that form and ``load_packed_weights`` turns the file back into the float model's
``state_dict`` with every quantized weight exactly equal to the one the trained model used::

    model.load_state_dict(load_packed_weights("model_w4.packed.pt"))  # model: the float architecture

File layout (``torch.save`` of a dict, no pickled classes): all packed codes in one uint8 tensor, all
scales in one float tensor, every other tensor in one flat tensor per dtype, and a small index of names,
shapes, bits and the layers' input grids. A handful of tensors keeps the archive overhead negligible even
for small models (see ``save_packed_weights``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qat_lightning.convert.readout import IntegerLayer, read_layer
from qat_lightning.nn import fake_quantized_layers
from qat_lightning.nn.fake_quantized import QUANTIZER_NAMES
from qat_lightning.quant import quant_range
from qat_lightning.quant.primitives import broadcast_along

FORMAT = "qat-lightning/packed-weights/v1"
PACKABLE_BITS = (2, 4, 8)
_QUANTIZER_KEYS = tuple(f".{name}." for name in QUANTIZER_NAMES)


def container_bits(bits: int) -> int:
    """Bits each code occupies in the packed file: the smallest of 2, 4, 8 that holds ``bits``."""
    for width in PACKABLE_BITS:
        if bits <= width:
            return width
    raise ValueError(f"`bits` must be at most 8 to pack weight codes into bytes, got {bits}.")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integers, ``8 // container_bits(bits)`` to a byte (little end first).

    Args:
        codes: integer tensor (any shape) with values in ``[-2**(bits-1), 2**(bits-1) - 1]``.
        bits: code width, 2..8.

    Returns:
        uint8 tensor of ``ceil(codes.numel() / per_byte)`` bytes; the i-th code (flattened) sits in byte
        ``i // per_byte`` at bit offset ``(i % per_byte) * width``, stored as ``code + 2**(width - 1)``.
    """
    width = container_bits(bits)
    qmin, qmax = quant_range(bits, symmetric=True)
    flat = codes.flatten().to(torch.int32)
    if flat.numel() and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(
            f"codes must lie in [{qmin}, {qmax}] to pack at {bits} bits, got [{flat.min()}, {flat.max()}]."
        )
    per_byte = 8 // width
    unsigned = flat + 2 ** (width - 1)
    unsigned = torch.cat([unsigned, unsigned.new_zeros((-flat.numel()) % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (unsigned << shifts).sum(dim=1).to(torch.uint8)


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    per_byte = 8 // container_bits(bits)
    return -(-numel // per_byte)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``numel`` codes as a flat int32 tensor."""
    width = container_bits(bits)
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    unsigned = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**width - 1)
    return unsigned.flatten()[:numel] - 2 ** (width - 1)


def _packed_layers(layers: Mapping[str, IntegerLayer]) -> dict[str, dict]:
    return {
        f"{name}.weight" if name else "weight": {
            "bits": layer.bits,
            "shape": tuple(layer.codes.shape),
            "codes": pack_codes(layer.codes, layer.bits),
            "scale": layer.scale.float().cpu(),
            "input": (layer.input.bits, layer.input.scale, layer.input.zero_point) if layer.input else None,
            "axis": layer.axis,
        }
        for name, layer in layers.items()
        if layer.bits <= 8
    }


def save_packed_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the weights of a fake-quant ``model`` with each quantized weight packed at its bit width.

    Reads the layers as ``integer_model.read_layer`` does, then ``write_packed_weights``.
    """
    layers = {name: read_layer(name, layer) for name, layer in fake_quantized_layers(model)}
    return write_packed_weights(model.state_dict(), layers, path)


def write_packed_weights(
    state_dict: Mapping[str, torch.Tensor], layers: Mapping[str, IntegerLayer], path: str | Path
) -> Path:
    """Write ``state_dict`` (of a fake-quant model) with the weight of each of ``layers`` packed at its bits.

    ``layers`` are the integer read-out of the trained layers (before any BatchNorm fold). Layers wider than 8
    bits and all other tensors of the float model's ``state_dict`` (biases, BatchNorm, unquantized layers) are
    stored as they are. Quantizer state is not stored: the codes, the per-channel scales and each layer's input
    grid ``(bits, scale, zero_point)`` in the index are all the quantized model needs.

    Layout: ``layers`` lists ``(name, bits, shape, input_grid)``; their packed codes follow each other in
    ``banks["codes"]`` and their scales in ``banks["scales"]``; ``axes`` gives ``{name: axis}`` of the layers whose
    scales run along another weight axis than 0 (ConvTranspose: 1). ``tensors`` lists ``(name, shape)`` per dtype;
    their values follow each other in ``banks[dtype]``.
    """
    layers = _packed_layers(layers)
    float_state = {
        k: v.detach().cpu()
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and k not in layers and not any(s in f".{k}" for s in _QUANTIZER_KEYS)
    }
    banks: dict[str, list[torch.Tensor]] = defaultdict(list)
    tensors: dict[str, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    for layer in layers.values():
        banks["codes"].append(layer["codes"])
        banks["scales"].append(layer["scale"])
    for name, tensor in float_state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        banks[dtype].append(tensor.flatten())
        tensors[dtype].append((name, tuple(tensor.shape)))
    payload = {
        "format": FORMAT,
        "layers": [(name, v["bits"], v["shape"], v["input"]) for name, v in layers.items()],
        "axes": {name: v["axis"] for name, v in layers.items() if v["axis"] != 0},
        "tensors": dict(tensors),
        "banks": {k: torch.cat(v) for k, v in banks.items()},
    }
    path = Path(path)
    torch.save(payload, path)
    return path


def _head(bank: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` values of ``bank`` (a copy) and the rest."""
    return bank[:size].clone(), bank[size:]


def load_packed_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The float ``state_dict`` stored by ``save_packed_weights``, quantized weights unpacked and dequantized.

    Each quantized weight equals ``codes * scale`` per output channel, bit for bit the weight the trained
    fake-quant model used. Loads with ``weights_only=True`` (no code is unpickled).
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a packed weight file of format {FORMAT!r}.")
    banks = payload["banks"]
    state = {}
    for dtype, entries in payload["tensors"].items():
        for name, shape in entries:
            state[name], banks[dtype] = _head(banks[dtype], torch.Size(shape).numel())
            state[name] = state[name].reshape(shape)
    axes = payload.get("axes", {})  # absent from files of earlier versions
    for name, bits, shape, _ in payload["layers"]:  # codes and scales follow each other in layer order
        numel = torch.Size(shape).numel()
        axis = axes.get(name, 0)
        codes, banks["codes"] = _head(banks["codes"], packed_size(numel, bits))
        scale, banks["scales"] = _head(banks["scales"], shape[axis])
        weight_codes = unpack_codes(codes, bits, numel).reshape(shape)
        state[name] = weight_codes.float() * broadcast_along(scale, weight_codes, axis)
    return state
