"""Plan and apply fake quantization over a whole model, without the user rewriting it."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qat_lightning.nn.fake_quantized import (
    FakeQuantizedLayer,
    FakeQuantizedModule,
    fake_quantize_layer,
    is_quantizable,
    restore_float_layer,
    weight_channel_axis,
)
from qat_lightning.nn.input_sharing import share_input_quantizers, unshare_input_quantizers
from qat_lightning.nn.normalization import BATCH_NORM_TYPES, NORMALIZATION_TYPES
from qat_lightning.nn.output_rounding import output_roundings_in_state_dict, remove_output_roundings, round_outputs
from qat_lightning.nn.recipe import QuantizationRecipe, recipe_from_arguments
from qat_lightning.quant import FakeQuantizer, QuantizerConfig
from qat_lightning.quant.config import ObserverName


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its qualified name, type and the configs of its two quantizers.

    ``input_from``: the module at whose output the input quantizer is applied, shared with the other layers that
    read that output (``input_sharing``); ``None``: the layer rounds its own input.
    """

    name: str
    layer_type: str
    weight: QuantizerConfig
    activation: QuantizerConfig | None
    input_from: str | None = None


@dataclass(frozen=True)
class FloatLayer:
    """A layer with weights of its own that the plan leaves float: its qualified name, type and why."""

    name: str
    layer_type: str
    reason: str


def _matching_pattern(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


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
    reduce_range: bool = QuantizationRecipe.reduce_range,
    recipe: QuantizationRecipe | None = None,
) -> list[LayerPlan]:
    """One ``LayerPlan`` per quantizable layer of ``model`` not matched by an ``exclude`` glob pattern.

    Quantizable: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and MultiheadAttention (one entry for its
    projections and inputs, see ``FakeQuantizedMultiheadAttention``). ``float_layers`` lists, with the reason,
    every layer with weights that the plan leaves float.

    The plan follows ``recipe`` or, without one, the recipe the keyword arguments describe: they are the fields
    of :class:`~qat_lightning.nn.QuantizationRecipe`, with its defaults (first and last layer at 8 bits, LSQ at
    4 bits or fewer); give one or the other. ``activation_observer=None`` is a moving average (a training plan).
    Weights get symmetric quantizers (per channel along the output channels: axis 1 of a ConvTranspose weight),
    inputs per-tensor asymmetric ones.

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
        reduce_range=reduce_range,
    )
    layers = [
        (n, m) for n, m in model.named_modules() if is_quantizable(m) and _matching_pattern(n, recipe.exclude) is None
    ]
    resolved = _resolve_bits([n for n, _ in layers], recipe.bits, recipe.first_last_bits, recipe.layer_bits)
    overridden = {n for n, b in resolved.items() if b != recipe.bits}
    plan = []
    for name, module in layers:
        w_bits = resolved[name]
        a_bits = recipe.input_bits(w_bits, own_width=name in overridden)
        plan.append(
            LayerPlan(
                name=name,
                layer_type=type(module).__name__,
                weight=dataclasses.replace(recipe.weight_config(w_bits), channel_axis=weight_channel_axis(module)),
                activation=recipe.input_config(a_bits) if a_bits else None,
            )
        )
    return plan


_EXTRA_STATE = "._extra_state"
# {quantizer holding a layer's weight config: the quantizer holding its input config}, for layers and attention
# (whose separate q/k/v weight quantizers share one config).
_CONFIG_QUANTIZERS = {
    "weight_quantizer": "input_quantizer",
    "in_proj_weight_quantizer": "query_quantizer",
    "q_proj_weight_quantizer": "query_quantizer",
}


def _out_projection(attention: str) -> str:
    """The qualified name of the ``out_proj`` of the attention module called ``attention``."""
    return f"{attention}.out_proj" if attention else "out_proj"


def plan_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> list[LayerPlan]:
    """The plan a state dict was saved with, read from its quantizers' extra state (empty if none).

    Layer names are relative to ``prefix``; ``layer_type`` is not stored and is left empty. An attention module
    is one entry: its ``out_proj`` is quantized with it.
    """
    plan: dict[str, LayerPlan] = {}
    attention = set()
    for key, extra in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(_EXTRA_STATE)):
            continue
        name, _, quantizer = key[len(prefix) : -len(_EXTRA_STATE)].rpartition(".")
        if quantizer not in _CONFIG_QUANTIZERS:
            continue
        if quantizer != "weight_quantizer":
            attention.add(name)
        activation = state_dict.get(f"{prefix}{name}.{_CONFIG_QUANTIZERS[quantizer]}{_EXTRA_STATE}")
        plan[name] = LayerPlan(
            name=name,
            layer_type="",
            weight=QuantizerConfig(**extra["config"]),
            activation=QuantizerConfig(**activation["config"]) if activation else None,
            input_from=activation.get("producer") if activation else None,
        )
    out_projections = {_out_projection(name) for name in attention}
    return [layer for name, layer in plan.items() if name not in out_projections]


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> bool:
    """Rebuild the fake-quant structure a state dict was saved with (its output roundings included, see
    ``output_rounding``), so that it loads into ``model``.

    Call it before ``model.load_state_dict(state_dict)``, or let :func:`prepare_on_load` call it on every load.
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
    for name, config in output_roundings_in_state_dict(state_dict, prefix).items():
        round_outputs(model, [name], config)
    return True


def prepare_on_load(model: nn.Module) -> RemovableHandle:
    """Make every ``model.load_state_dict(state_dict)`` rebuild the fake-quant structure ``state_dict`` was saved
    with first (:func:`prepare_for_state_dict`), so it loads into the float model.

    That covers ``LightningModule.load_from_checkpoint`` of a QAT checkpoint, a plain ``load_state_dict``, and the
    weights Lightning copies back into the main process after ``ddp_spawn``/``ddp_fork``/``ddp_notebook``, which it
    loads non-strictly (without this, that model stays float and the quantizers are dropped silently). Call it in
    the LightningModule's ``__init__``; returns the hook's handle (``.remove()`` undoes it).
    """
    return model.register_load_state_dict_pre_hook(_prepare_before_loading)


def _prepare_before_loading(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    prepare_for_state_dict(module, state_dict, prefix)


def format_plan(plan: Sequence[LayerPlan], float_layers: Sequence[FloatLayer] = ()) -> str:
    """The plan as a fixed-width text table: layer, type, weight bits, activation bits, quantizer; an input
    quantized where it is produced shows ``@ <producer>`` after its bits.

    ``float_layers`` (see ``float_layers``) follow the planned layers, with ``float`` bit widths and their reason
    in the last column.
    """
    rows = [("layer", "type", "w_bits", "a_bits", "quantizer")]
    for p in plan:
        quantizer = "lsq" if p.weight.learned_scale else p.weight.observer
        if p.activation is not None and p.activation.learned_scale != p.weight.learned_scale:
            quantizer += " / " + ("lsq" if p.activation.learned_scale else p.activation.observer)
        a_bits = str(p.activation.bits) if p.activation else "float"
        if p.input_from is not None:
            a_bits += f" @ {p.input_from}"
        rows.append((p.name, p.layer_type, str(p.weight.bits), a_bits, quantizer))
    rows.extend((f.name, f.layer_type, "float", "float", f.reason) for f in float_layers)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _has_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds a weight of its own (``weight``, or a parameter named like ``weight_ih_l0``)."""
    return isinstance(getattr(module, "weight", None), torch.Tensor) or any(
        "weight" in name for name, _ in module.named_parameters(recurse=False)
    )


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` stays float if it has weights but no fake-quantized form (``None``: not such a layer).

    Normalization layers do not count: BatchNorm is folded into the layer before it at conversion, LayerNorm and
    GroupNorm scale each element.
    """
    if isinstance(module, (FakeQuantizedModule, NORMALIZATION_TYPES)) or is_quantizable(module):
        return None
    if not _has_weights(module):
        return None
    if isinstance(module, _EMBEDDING_TYPES):
        return "embedding table (lookups are not fake-quantized)"
    return f"unsupported type `{type(module).__name__}`"


def _weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` but the out-projections of attention modules (which are
    quantized, or left float, with their attention module)."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    out_projections = {_out_projection(name) for name in attention}
    for name, module in model.named_modules():
        if name not in out_projections:
            yield name, module


def float_layers(model: nn.Module, plan: Sequence[LayerPlan], exclude: Sequence[str] = ()) -> list[FloatLayer]:
    """Every layer of ``model`` with weights of its own that stays float under ``plan``, with the reason.

    Reasons: ``excluded by pattern '<glob>'`` (one of ``exclude``), ``not in the plan`` (a quantizable layer that
    ``plan`` leaves out otherwise), an embedding table, or an ``unsupported type `<Type>```. Layers already
    fake-quantized, normalization layers and the out-projection of an attention module (listed as its module)
    are not float layers.

    Args:
        model: the model ``plan`` was made for (float, or prepared with it).
        plan: its plan (``plan_quantization``).
        exclude: the ``exclude`` patterns ``plan`` was made with.
    """
    planned = {p.name for p in plan}
    layers = []
    for name, module in _weight_layers(model):
        if is_quantizable(module) and name not in planned:
            pattern = _matching_pattern(name, exclude)
            reason = f"excluded by pattern {pattern!r}" if pattern is not None else "not in the plan"
        else:
            reason = _unsupported_reason(module)
        if reason is not None:
            layers.append(FloatLayer(name, type(module).__name__, reason))
    return layers


def unsupported_layers(model: nn.Module) -> list[str]:
    """Layers with their own weights that cannot be fake-quantized and so stay float, as ``name (Type)``."""
    return [
        f"{name} ({type(module).__name__})"
        for name, module in _weight_layers(model)
        if _unsupported_reason(module) is not None
    ]


def _unfused(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence keeps a TransformerEncoderLayer off its fused kernel."""


def _keep_transformers_unfused(model: nn.Module) -> None:
    """Make torch's transformer encoders run their fake-quantized layers in eval mode too.

    In eval mode without autograd, ``nn.TransformerEncoderLayer`` runs one fused kernel on the float weights of
    its attention and Linear layers, bypassing their forward passes; it does not when a forward hook is attached
    (torch's own condition), so each layer holding a fake-quantized module gets the no-op ``_unfused``.
    ``nn.TransformerEncoder`` would hand such layers nested tensors, which only the fused kernel takes: its
    ``use_nested_tensor`` is turned off (the numbers do not change).
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        if not isinstance(module, nn.TransformerEncoderLayer) or _unfused in module._forward_pre_hooks.values():
            continue
        if any(isinstance(m, FakeQuantizedModule) for m in module.modules()):
            module.register_forward_pre_hook(_unfused)


def apply_plan(model: nn.Module, plan: Sequence[LayerPlan]) -> None:
    """Fake-quantize, in place, every layer named in ``plan`` (inputs shared at ``input_from`` where given).

    ``nn.TransformerEncoderLayer``s that hold a fake-quantized module are kept off torch's fused eval kernel, which
    would compute with the float weights (``_keep_transformers_unfused``).
    """
    modules = dict(model.named_modules())
    for layer in plan:
        fake_quantize_layer(modules[layer.name], layer.weight, layer.activation)
    share_input_quantizers(model, {p.name: p.input_from for p in plan if p.input_from is not None})
    _keep_transformers_unfused(model)


def with_input_producers(plan: Sequence[LayerPlan], producers: Mapping[str, str]) -> list[LayerPlan]:
    """``plan`` with ``input_from`` set from ``{layer: producer}`` (what ``share_input_quantizers`` returned)."""
    return [dataclasses.replace(p, input_from=producers.get(p.name, p.input_from)) for p in plan]


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
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORM_TYPES)]
    for bn in bns:
        bn.eval()
    return len(bns)


def restore_float(model: nn.Module) -> None:
    """Undo fake quantization everywhere in ``model`` (weights keep their current float values; a
    ``TransformerEncoder`` keeps ``use_nested_tensor`` off)."""
    remove_output_roundings(model)
    unshare_input_quantizers(model)
    for module in list(model.modules()):
        if isinstance(module, FakeQuantizedModule):  # an attention module restores its out_proj first
            restore_float_layer(module)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _unfused:
                del module._forward_pre_hooks[key]
