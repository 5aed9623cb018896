"""Fake-quantized training versions of ``nn.Conv1d/2d/3d`` and ``nn.Linear``.

A layer is converted *in place*: its class becomes a subclass of its own class whose ``forward`` rounds the
input activation and the weight to their integer grids before the usual convolution/matmul, and two child
modules (``input_quantizer``, ``weight_quantizer``) are added. The module object, its Parameters, hooks and
parametrizations all stay the same, so optimizers, user references (``model.fc``) and ``isinstance`` checks
keep working. ``torch.nn.utils.parametrize`` uses the same technique.

Parametrized layers (e.g. under ``torch.nn.utils.parametrizations.weight_norm``) keep torch's dynamic
``Parametrized<Class>`` as their outermost class, rebuilt on top of the fake-quantized class, so that
``parametrize.remove_parametrizations`` (which restores ``type(module).__bases__[0]``) leaves a working
fake-quantized layer, and ``restore_float_layer`` leaves a working parametrized float layer.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from qat_lightning.quant import FakeQuantizer, QuantizerConfig

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Subclasses whose forward never runs (attention calls F.multi_head_attention_forward with their weights).
_UNQUANTIZABLE_SUBCLASSES: tuple[type[nn.Module], ...] = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


class FakeQuantizedLayer(nn.Module):
    """Marker base of every fake-quantized layer; ``float_class`` is the class it was converted from."""

    float_class: ClassVar[type[nn.Module]]
    weight_quantizer: FakeQuantizer
    input_quantizer: nn.Module  # a FakeQuantizer, or nn.Identity when activations stay float

    def quantized_input(self, input: torch.Tensor) -> torch.Tensor:
        """``input`` on the input grid: rounded here, or as it comes when it was rounded where it was produced
        (a quantizer shared at its producer's output, see ``input_sharing``)."""
        if getattr(self.input_quantizer, "producer", None) is not None:
            return input
        return self.input_quantizer(input)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (on the grid), without updating any observer."""
        was_training = self.weight_quantizer.training
        self.weight_quantizer.eval()
        try:
            return self.weight_quantizer(self.weight)
        finally:
            self.weight_quantizer.train(was_training)


class _FakeQuantizedConv(FakeQuantizedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(  # type: ignore[attr-defined]
            self.quantized_input(input), self.weight_quantizer(self.weight), self.bias
        )


class _FakeQuantizedLinear(FakeQuantizedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


class FakeQuantizedConv1d(_FakeQuantizedConv, nn.Conv1d):
    float_class = nn.Conv1d


class FakeQuantizedConv2d(_FakeQuantizedConv, nn.Conv2d):
    float_class = nn.Conv2d


class FakeQuantizedConv3d(_FakeQuantizedConv, nn.Conv3d):
    float_class = nn.Conv3d


class FakeQuantizedLinear(_FakeQuantizedLinear, nn.Linear):
    float_class = nn.Linear


_STATIC_CLASSES: dict[type[nn.Module], type[FakeQuantizedLayer]] = {
    nn.Conv1d: FakeQuantizedConv1d,
    nn.Conv2d: FakeQuantizedConv2d,
    nn.Conv3d: FakeQuantizedConv3d,
    nn.Linear: FakeQuantizedLinear,
}


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv1d/2d/3d or Linear (or subclass) whose forward can be fake-quantized."""
    return (
        isinstance(module, QUANTIZABLE_TYPES)
        and not isinstance(module, _UNQUANTIZABLE_SUBCLASSES)
        and not isinstance(module, FakeQuantizedLayer)
    )


@functools.cache
def _fake_quantized_class(float_class: type[nn.Module]) -> type[FakeQuantizedLayer]:
    """The fake-quantized subclass of ``float_class`` (static for torch's own classes, else made once)."""
    if float_class in _STATIC_CLASSES:
        return _STATIC_CLASSES[float_class]
    mixin = _FakeQuantizedLinear if issubclass(float_class, nn.Linear) else _FakeQuantizedConv
    attrs: dict[str, Any] = {"float_class": float_class, "__module__": __name__}
    return type(f"FakeQuantized{float_class.__name__}", (mixin, float_class), attrs)


def _unparametrized_class(module: nn.Module) -> type[nn.Module]:
    """The class of ``module`` below torch's parametrization wrapper (``torch``'s own convention)."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _set_class(module: nn.Module, cls: type[nn.Module]) -> None:
    """Give ``module`` the class ``cls``, keeping its parametrizations working.

    ``parametrize`` holds one property per parametrized tensor in a dynamic subclass of the module's class and
    restores that subclass's first base when the last parametrization is removed; the wrapper is therefore
    rebuilt on top of ``cls`` instead of being replaced by it.
    """
    if parametrize.is_parametrized(module):
        wrapper = type(module)
        attrs = {k: v for k, v in vars(wrapper).items() if k not in ("__dict__", "__weakref__")}
        cls = type(f"Parametrized{cls.__name__}", (cls,), attrs)
    module.__class__ = cls


def fake_quantize_layer(
    module: nn.Module, weight: QuantizerConfig, activation: QuantizerConfig | None
) -> FakeQuantizedLayer:
    """Turn a quantizable layer into its fake-quantized version, in place, and return it.

    Args:
        module: an ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (see ``is_quantizable``).
        weight: config of the weight quantizer (per channel along output channels when ``per_channel``).
        activation: config of the input quantizer, or ``None`` to leave the input in float.
    """
    if not is_quantizable(module):
        raise TypeError(f"{type(module).__name__} cannot be fake-quantized; expected one of {QUANTIZABLE_TYPES}.")
    ref = module.weight
    module.weight_quantizer = FakeQuantizer(weight, ref.shape[weight.channel_axis]).to(ref.device)
    module.input_quantizer = FakeQuantizer(activation).to(ref.device) if activation else nn.Identity()
    module.weight_quantizer.train(module.training)
    module.input_quantizer.train(module.training)
    _set_class(module, _fake_quantized_class(_unparametrized_class(module)))
    return module  # type: ignore[return-value]


def restore_float_layer(module: FakeQuantizedLayer) -> nn.Module:
    """Undo ``fake_quantize_layer`` in place: drop the quantizers and restore the original class."""
    del module.weight_quantizer
    del module.input_quantizer
    _set_class(module, module.float_class)
    return module
