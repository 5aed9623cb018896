"""Plan and apply fake quantization over a whole model, without the user rewriting it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qat_lightning.nn.fake_quantized import (
    FakeQuantizedLayer,
    fake_quantize_layer,
    is_quantizable,
    restore_float_layer,
)
from qat_lightning.nn.recipe import QuantizationRecipe, recipe_from_arguments
from qat_lightning.quant import FakeQuantizer, QuantizerConfig
from qat_lightning.quant.config import ObserverName

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


def _resolve_bits(
    names: list[str], bits: int, first_last_bits: int | None, layer_bits: Mapping[str, int]
) -> dict[str, int]:
    """Bit width of each layer: ``bits``, then ``first_last_bits`` for the first and last, then overrides."""
    resolved = dict.fromkeys(names, bits)
    if first_last_bits is not None and names:
        resolved[names[0]] = resolved[names[-1]] = first_last_bits
    for pattern, value in layer_bits.items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"`layer_bits` pattern {pattern!r} matches no quantizable layer; layer names are: {shown}."
            )
        resolved.update(dict.fromkeys(matched, value))
    return resolved


def _input_bits(weight_bits: int) -> int:
    """Default input width of a layer: its weight width, but 7 bits for 8-bit layers.

    Like torch's x86 QAT default (``reduce_range``): oneDNN's int8 kernels on CPUs without VNNI/AMX add pairs of
    8-bit x 8-bit products in 16 bits and can saturate; 7-bit inputs never do, so the int8 model stays exact.
    """
    return 7 if weight_bits == 8 else weight_bits


def plan_quantization(
    model: nn.Module,
    bits: int = QuantizationRecipe.bits,
    activation_bits: int | None = QuantizationRecipe.activation_bits,
    exclude: Sequence[str] = QuantizationRecipe.exclude,
    *,
    first_last_bits: int | None = QuantizationRecipe.first_last_bits,
    layer_bits: Mapping[str, int] | None = None,
    learned_scale: bool | None = QuantizationRecipe.learned_scale,
    per_channel_weights: bool = QuantizationRecipe.per_channel_weights,
    weight_observer: ObserverName = QuantizationRecipe.weight_observer,
    activation_observer: ObserverName | None = QuantizationRecipe.activation_observer,
    recipe: QuantizationRecipe | None = None,
) -> list[LayerPlan]:
    """One ``LayerPlan`` per quantizable layer of ``model`` not matched by an ``exclude`` glob pattern.

    The plan follows ``recipe`` or, without one, the recipe the keyword arguments describe: they are the fields
    of :class:`~qat_lightning.nn.QuantizationRecipe`, with its defaults (first and last layer at 8 bits, LSQ at
    4 bits or fewer); give one or the other. ``activation_observer=None`` is a moving average (a training plan).
    Weights get symmetric quantizers, inputs per-tensor asymmetric ones.

    Raises:
        ValueError: for an invalid recipe (naming the argument), or a ``layer_bits`` pattern that matches no layer.
    """
    recipe = recipe_from_arguments(
        recipe,
        bits=bits,
        activation_bits=activation_bits,
        exclude=exclude,
        first_last_bits=first_last_bits,
        layer_bits={} if layer_bits is None else layer_bits,
        learned_scale=learned_scale,
        per_channel_weights=per_channel_weights,
        weight_observer=weight_observer,
        activation_observer=activation_observer,
    )
    layers = [(n, m) for n, m in model.named_modules() if is_quantizable(m) and not _matches(n, recipe.exclude)]
    resolved = _resolve_bits([n for n, _ in layers], recipe.bits, recipe.first_last_bits, recipe.layer_bits)
    overridden = {n for n, b in resolved.items() if b != recipe.bits}
    activation_bits = recipe.activation_bits

    plan = []
    for name, module in layers:
        w_bits = resolved[name]
        a_bits = activation_bits if activation_bits is not None and name not in overridden else _input_bits(w_bits)
        plan.append(
            LayerPlan(
                name=name,
                layer_type=type(module).__name__,
                weight=recipe.weight_config(w_bits),
                activation=recipe.input_config(a_bits) if a_bits and activation_bits != 0 else None,
            )
        )
    return plan


_EXTRA_STATE = "._extra_state"


def plan_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> list[LayerPlan]:
    """The plan a state dict was saved with, read from its quantizers' extra state (empty if none).

    Layer names are relative to ``prefix``; ``layer_type`` is not stored and is left empty.
    """
    suffix = ".weight_quantizer" + _EXTRA_STATE
    plan = []
    for key, extra in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        name = key[len(prefix) : -len(suffix)]
        activation = state_dict.get(f"{prefix}{name}.input_quantizer{_EXTRA_STATE}")
        plan.append(
            LayerPlan(
                name=name,
                layer_type="",
                weight=QuantizerConfig(**extra["config"]),
                activation=QuantizerConfig(**activation["config"]) if activation else None,
            )
        )
    return plan


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> bool:
    """Rebuild the fake-quant structure a state dict was saved with, so that it loads into ``model``.

    Call it before ``model.load_state_dict(state_dict)`` (e.g. from ``LightningModule.on_load_checkpoint``).
    Does nothing if ``model`` is already prepared or the state dict holds no quantizers; returns whether
    it prepared the model.
    """
    plan = plan_from_state_dict(state_dict, prefix)
    if not plan or is_prepared(model):
        return False
    modules = dict(model.named_modules())
    missing = [p.name for p in plan if p.name not in modules]
    if missing:
        raise ValueError(
            f"The state dict quantizes layers this model does not have: {missing}; load it into the model "
            "architecture it was trained with."
        )
    apply_plan(model, plan)
    return True


def format_plan(plan: Sequence[LayerPlan]) -> str:
    """The plan as a fixed-width text table: layer, type, weight bits, activation bits, quantizer."""
    rows = [("layer", "type", "w_bits", "a_bits", "quantizer")]
    for p in plan:
        quantizer = "lsq" if p.weight.learned_scale else p.weight.observer
        if p.activation is not None and p.activation.learned_scale != p.weight.learned_scale:
            quantizer += " / " + ("lsq" if p.activation.learned_scale else p.activation.observer)
        a_bits = str(p.activation.bits) if p.activation else "float"
        rows.append((p.name, p.layer_type, str(p.weight.bits), a_bits, quantizer))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
