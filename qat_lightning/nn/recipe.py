"""``QuantizationRecipe``: how a model is quantized, in one dataclass that ``plan_quantization`` and
``QuantizationCallback`` both read (validated on construction)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qat_lightning.quant import QuantizerConfig, activation_config, check_bits, weight_config
from qat_lightning.quant.config import OBSERVERS, ObserverName
from qat_lightning.quant.primitives import MAX_BITS, MIN_BITS


def _check_optional_bits(value: object, name: str, zero_means: str = "") -> None:
    """``None``, an integer in 2..16, or (when ``zero_means`` says what it means) 0."""
    if value is None or (zero_means and type(value) is int and value == 0):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        zero = f", 0 ({zero_means})" if zero_means else ""
        raise ValueError(f"`{name}` must be an integer in {MIN_BITS}..{MAX_BITS}{zero} or None, got {value!r}.")


def _check_flag(value: object, name: str, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        allowed = "True, False or None" if optional else "True or False"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_observer(value: object, name: str, optional: bool = False) -> None:
    if value not in OBSERVERS and not (optional and value is None):
        allowed = ", ".join(repr(o) for o in OBSERVERS) + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


@dataclass(frozen=True)
class QuantizationRecipe:
    """Which layers are fake-quantized, at which bit widths, with which quantizers.

    The defaults are the product's: weights at 4 bits, per-channel symmetric over the current weights' range;
    layer inputs per-tensor asymmetric at the layer's weight width over a moving average of their range; the
    first and the last quantizable layer at 8 bits; LSQ learned scales for quantizers at 4 bits or fewer.
    ``QuantizationRecipe()`` is what ``QuantizationCallback()`` and ``plan_quantization(model)`` use.

    Args:
        bits: weight bit width of every quantizable layer unless overridden, 2..16.
        activation_bits: input bit width of the layers at ``bits`` (``None``: the layer's weight bits; 8-bit
            layers read the full unsigned 8-bit range, as torchao's X86InductorQuantizer and NNCF quantize, not
            torch.ao's 7-bit ``reduce_range``; ``0``: every layer's inputs stay float). Layers given their own
            width by ``first_last_bits`` or ``layer_bits`` follow the ``None`` rule.
        first_last_bits: bit width of the first and the last quantizable layer (module definition order), weights
            and inputs (``None``: like the other layers).
        layer_bits: ``{glob pattern: bits}`` overrides by layer name (as in ``model.named_modules()``), weights and
            inputs, applied last, e.g. ``{"features.0": 8, "classifier.*": 8}``; a pattern that matches no layer
            is an error when the plan is made.
        exclude: glob patterns of layer names that stay float.
        learned_scale: LSQ learned step sizes for every quantizer (``True``), observed ranges for every one
            (``False``), or LSQ for quantizers at 4 bits or fewer (``None``).
        per_channel_weights: one weight scale per output channel (else one per tensor).
        weight_observer: how weight ranges are observed: ``"moving_average"`` (with averaging constant 1: the
            current weights), ``"minmax"`` or ``"mse"``.
        activation_observer: how input ranges are observed: ``"moving_average"``, ``"minmax"`` or ``"mse"``
            (``None``: moving average when training, MSE-searched clipping when calibrating after training).
        reduce_range: every 8-bit input grid on 7 bits (torch.ao's x86 ``reduce_range``), for int8 kernels that
            add pairs of 8-bit products in 16 bits and saturate on 8-bit inputs: oneDNN and fbgemm on x86 CPUs
            without VNNI (AVX2 only), where the ``x86`` backend otherwise refuses the model. The default 8-bit
            grid is faster in OpenVINO on VNNI CPUs and is what NNCF and torchao's X86InductorQuantizer use.

    Raises:
        ValueError: naming the argument and its allowed values, for any value outside them.
    """

    bits: int = 4
    activation_bits: int | None = None
    first_last_bits: int | None = 8
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    exclude: Sequence[str] = ()
    learned_scale: bool | None = None
    per_channel_weights: bool = True
    weight_observer: ObserverName = "moving_average"
    activation_observer: ObserverName | None = None
    reduce_range: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        _check_optional_bits(self.activation_bits, "activation_bits", zero_means="inputs stay float")
        _check_optional_bits(self.first_last_bits, "first_last_bits")
        if not isinstance(self.layer_bits, Mapping):
            raise ValueError(f"`layer_bits` must be a mapping {{glob pattern: bits}}, got {self.layer_bits!r}.")
        for pattern, value in self.layer_bits.items():
            if not isinstance(pattern, str):
                raise ValueError(f"`layer_bits` keys must be glob patterns of layer names (str), got {pattern!r}.")
            check_bits(value, f"layer_bits[{pattern!r}]")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(
                f"`exclude` must be a sequence of glob patterns of layer names, e.g. ('head.*',), got {self.exclude!r}."
            )
        _check_flag(self.learned_scale, "learned_scale", optional=True)
        _check_flag(self.per_channel_weights, "per_channel_weights")
        _check_observer(self.weight_observer, "weight_observer")
        _check_observer(self.activation_observer, "activation_observer", optional=True)
        _check_flag(self.reduce_range, "reduce_range")
        # Own copies, so that a recipe never changes with the caller's dict or list.
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def input_bits(self, weight_bits: int, own_width: bool) -> int:
        """Input width of a layer with ``weight_bits``-bit weights (``0``: its inputs stay float): ``activation_bits``
        for the layers at ``bits``, the weight width for those given ``own_width`` (by ``first_last_bits`` or
        ``layer_bits``) or when ``activation_bits`` is ``None``; ``0`` for every layer when ``activation_bits`` is
        ``0``; 8 becomes 7 with ``reduce_range``."""
        if self.activation_bits == 0:
            return 0
        width = weight_bits if self.activation_bits is None or own_width else self.activation_bits
        return 7 if self.reduce_range and width == 8 else width

    def learns_scale(self, bits: int) -> bool:
        """Whether a quantizer at ``bits`` bits learns its scale (LSQ) under this recipe."""
        return bits <= 4 if self.learned_scale is None else self.learned_scale

    def weight_config(self, bits: int) -> QuantizerConfig:
        """The weight quantizer of a layer at ``bits`` bits."""
        return weight_config(bits, self.learns_scale(bits), self.per_channel_weights, self.weight_observer)

    def input_config(self, bits: int) -> QuantizerConfig:
        """The input quantizer of a layer whose inputs are at ``bits`` bits (``None`` observer: moving average)."""
        return activation_config(bits, self.learns_scale(bits), self.activation_observer or "moving_average")


def recipe_from_arguments(recipe: QuantizationRecipe | None, **arguments: Any) -> QuantizationRecipe:
    """``recipe``, or the recipe that ``arguments`` (``QuantizationRecipe`` fields) describe when it is ``None``.

    A recipe and arguments that differ from the recipe defaults cannot be given together: the error names them
    (an argument set to its default value cannot be told from one left out, so it never conflicts).
    """
    described = QuantizationRecipe(**arguments)
    if recipe is None:
        return described
    if not isinstance(recipe, QuantizationRecipe):
        raise ValueError(f"`recipe` must be a QuantizationRecipe or None, got {type(recipe).__name__}.")
    defaults = QuantizationRecipe()
    given = [
        f"`{f.name}`={getattr(described, f.name)!r}"
        for f in dataclasses.fields(QuantizationRecipe)
        if getattr(described, f.name) != getattr(defaults, f.name)
    ]
    if given:
        raise ValueError(
            f"Give the quantization recipe either as `recipe` or as keyword arguments, not both: {', '.join(given)} "
            "would be ignored; set them in the QuantizationRecipe instead."
        )
    return recipe
