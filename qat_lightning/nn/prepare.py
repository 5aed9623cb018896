"""Plan and apply fake quantization over a whole model, without the user rewriting it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from qat_lightning.nn.fake_quantized import (
    FakeQuantizedLayer,
    fake_quantize_layer,
    is_quantizable,
    restore_float_layer,
)
from qat_lightning.quant import FakeQuantizer, QuantizerConfig, activation_config, weight_config

_NORMALIZATION_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its qualified name, type and the configs of its two quantizers."""

    name: str
    layer_type: str
    weight: QuantizerConfig
    activation: QuantizerConfig | None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_quantization(
    model: nn.Module,
    bits: int,
    activation_bits: int | None = None,
    exclude: Sequence[str] = (),
) -> list[LayerPlan]:
    """One ``LayerPlan`` per quantizable layer of ``model`` not matched by an ``exclude`` glob pattern.

    Weights get per-channel symmetric quantizers at ``bits``; inputs get per-tensor asymmetric quantizers at
    ``activation_bits`` (``bits`` when ``None``; ``0`` leaves activations in float).
    """
    act_bits = bits if activation_bits is None else activation_bits
    return [
        LayerPlan(
            name=name,
            layer_type=type(module).__name__,
            weight=weight_config(bits),
            activation=activation_config(act_bits) if act_bits else None,
        )
        for name, module in model.named_modules()
        if is_quantizable(module) and not _matches(name, exclude)
    ]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Layers with their own weights that cannot be fake-quantized and so stay float, as ``name (Type)``."""
    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter)
        and not isinstance(module, (FakeQuantizedLayer, _NORMALIZATION_TYPES))
        and not is_quantizable(module)
    ]


def apply_plan(model: nn.Module, plan: Sequence[LayerPlan]) -> None:
    """Fake-quantize, in place, every layer named in ``plan``."""
    modules = dict(model.named_modules())
    for layer in plan:
        fake_quantize_layer(modules[layer.name], layer.weight, layer.activation)


def fake_quantized_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizedLayer]]:
    """``(name, layer)`` for every fake-quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizedLayer):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[FakeQuantizer]:
    """Every ``FakeQuantizer`` in ``model``."""
    return (m for m in model.modules() if isinstance(m, FakeQuantizer))


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one fake-quantized layer."""
    return next(fake_quantized_layers(model), None) is not None


def set_observers_enabled(model: nn.Module, enabled: bool) -> None:
    """Let every observer of ``model`` update (``True``) or freeze the scales where they are (``False``)."""
    for quantizer in quantizers(model):
        quantizer.observer_enabled = enabled


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (use and keep its running statistics); return how many."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.eval()
    return len(bns)


def restore_float(model: nn.Module) -> None:
    """Undo fake quantization everywhere in ``model`` (weights keep their current float values)."""
    for _, layer in list(fake_quantized_layers(model)):
        restore_float_layer(layer)
