"""Fake-quantized training versions of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear`` and
``nn.MultiheadAttention``.

A layer is converted *in place*: its class becomes a subclass of its own class whose ``forward`` rounds the
input activation and the weight to their integer grids before the usual convolution/matmul, and two child
modules (``input_quantizer``, ``weight_quantizer``) are added. A ``MultiheadAttention`` gets one quantizer per
input and per in-projection weight, and its ``out_proj`` becomes a fake-quantized Linear
(``FakeQuantizedMultiheadAttention``). The module object, its Parameters, hooks and
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

from qat_lightning.nn import recomputed_input, transposed_padding
from qat_lightning.nn.attention import multi_head_attention
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES, ConvTranspose
from qat_lightning.quant import FakeQuantizer, QuantizerConfig

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.MultiheadAttention,
)
# The out-projection of attention: quantized with its MultiheadAttention (whose forward calls it), never alone.
_UNQUANTIZABLE_SUBCLASSES: tuple[type[nn.Module], ...] = (nn.modules.linear.NonDynamicallyQuantizableLinear,)
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def weight_channel_axis(module: nn.Module) -> int:
    """The axis of ``module``'s weight that holds its output channels: 1 for ConvTranspose, else 0.

    A ConvTranspose weight is ``(in_channels, out_channels / groups, *kernel)``: with ``groups > 1`` one slice
    along axis 1 holds the ``groups`` output channels of the same index in each group.
    """
    return 1 if isinstance(module, CONV_TRANSPOSE_TYPES) else 0


_SEPARATE_PROJECTIONS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")  # attention with kdim/vdim
_ATTENTION_INPUTS = ("query", "key", "value")
# The names of the quantizer child modules a fake-quantized module can have.
QUANTIZER_NAMES: tuple[str, ...] = tuple(
    f"{name}_quantizer" for name in ("weight", "input", "in_proj_weight", *_SEPARATE_PROJECTIONS, *_ATTENTION_INPUTS)
)


def _quantizer_names(module: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What ``module``'s quantizers round: its weight attributes and its inputs (each quantizer is the name plus
    ``_quantizer``). An attention module's ``out_proj`` has its own."""
    if not isinstance(module, nn.MultiheadAttention):
        return ("weight",), ("input",)
    packed = module.in_proj_weight is not None  # one (3 * embed_dim, embed_dim) weight unless kdim/vdim differ
    return ("in_proj_weight",) if packed else _SEPARATE_PROJECTIONS, _ATTENTION_INPUTS


class FakeQuantizedModule(nn.Module):
    """Marker base of every fake-quantized module; ``float_class`` is the class it was converted from.

    The quantizer of a weight attribute or an input ``<name>`` is the child module ``<name>_quantizer``.
    """

    float_class: ClassVar[type[nn.Module]]

    def weight_quantizers(self) -> dict[str, FakeQuantizer]:
        """``{weight attribute: its quantizer}`` of the weights this module itself rounds."""
        return {name: getattr(self, f"{name}_quantizer") for name in _quantizer_names(self)[0]}

    def input_quantizers(self) -> dict[str, nn.Module]:
        """``{input: its quantizer}`` (``nn.Identity`` where the input stays float): ``input``, or ``query``,
        ``key`` and ``value`` for attention."""
        return {name: getattr(self, f"{name}_quantizer") for name in _quantizer_names(self)[1]}

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        """``{weight attribute: the weight as the forward pass uses it (on its grid)}``, no observer updated."""
        grids = {}
        for name, quantizer in self.weight_quantizers().items():
            was_training = quantizer.training
            quantizer.eval()
            try:
                grids[name] = quantizer(getattr(self, name))
            finally:
                quantizer.train(was_training)
        return grids


class FakeQuantizedLayer(FakeQuantizedModule):
    """Marker base of every fake-quantized Conv/ConvTranspose/Linear layer (one weight, one input)."""

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
        return self.quantized_weights()["weight"]


class _FakeQuantizedConv(FakeQuantizedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rounded, weight = self.quantized_input(input), self.weight_quantizer(self.weight)
        out = recomputed_input.convolution(self, rounded, weight)  # type: ignore[arg-type]
        return self._conv_forward(rounded, weight, self.bias) if out is None else out  # type: ignore[attr-defined]


class _FakeQuantizedLinear(FakeQuantizedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


def conv_transpose(
    layer: ConvTranspose,
    input: torch.Tensor,
    weight: torch.Tensor,
    output_size: list[int] | None = None,
) -> torch.Tensor:
    """What ``layer(input, output_size)`` computes, with ``weight`` in place of ``layer.weight``.

    Args:
        layer: a ConvTranspose1d/2d/3d (its bias, stride, padding, dilation and groups are used).
        input: ``(N, in_channels, *spatial)`` or unbatched ``(in_channels, *spatial)``.
        weight: ``(in_channels, out_channels / groups, *kernel)``, the shape of ``layer.weight``.
        output_size: the spatial output size to pick among those the stride allows (``None``: the smallest).
    """
    spatial = len(layer.kernel_size)
    output_padding = transposed_padding.output_padding(layer, input.shape, output_size)
    return _CONV_TRANSPOSE[spatial](
        input, weight, layer.bias, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation
    )


class _FakeQuantizedConvTranspose(FakeQuantizedLayer):
    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        rounded, weight = self.quantized_input(input), self.weight_quantizer(self.weight)
        out = recomputed_input.convolution(self, rounded, weight, output_size)  # type: ignore[arg-type]
        return conv_transpose(self, rounded, weight, output_size) if out is None else out  # type: ignore[arg-type]


class FakeQuantizedConv1d(_FakeQuantizedConv, nn.Conv1d):
    float_class = nn.Conv1d


class FakeQuantizedConv2d(_FakeQuantizedConv, nn.Conv2d):
    float_class = nn.Conv2d


class FakeQuantizedConv3d(_FakeQuantizedConv, nn.Conv3d):
    float_class = nn.Conv3d


class FakeQuantizedLinear(_FakeQuantizedLinear, nn.Linear):
    float_class = nn.Linear


class _FakeQuantizedOutProjection(_FakeQuantizedLinear, nn.modules.linear.NonDynamicallyQuantizableLinear):
    """The out-projection of a ``FakeQuantizedMultiheadAttention`` (a named class, so that models pickle)."""

    float_class = nn.modules.linear.NonDynamicallyQuantizableLinear


class FakeQuantizedConvTranspose1d(_FakeQuantizedConvTranspose, nn.ConvTranspose1d):
    float_class = nn.ConvTranspose1d


class FakeQuantizedConvTranspose2d(_FakeQuantizedConvTranspose, nn.ConvTranspose2d):
    float_class = nn.ConvTranspose2d


class FakeQuantizedConvTranspose3d(_FakeQuantizedConvTranspose, nn.ConvTranspose3d):
    float_class = nn.ConvTranspose3d


class FakeQuantizedMultiheadAttention(FakeQuantizedModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its inputs and the weights of its projections on their integer grids.

    Child quantizers, named after what they round:

    - ``query_quantizer``, ``key_quantizer``, ``value_quantizer``: the inputs (``nn.Identity`` when float). A key
      that is the query tensor itself (self-attention) is rounded once, by ``query_quantizer``, and a value that
      is the key or the query likewise; the quantizer left unused then never observes anything.
    - ``in_proj_weight_quantizer`` (per channel: one scale per row of the ``(3 * embed_dim, embed_dim)``
      weight), or ``q_proj_weight_quantizer``, ``k_proj_weight_quantizer``, ``v_proj_weight_quantizer`` when
      ``kdim``/``vdim`` differ from ``embed_dim``.
    - ``out_proj`` is a fake-quantized Linear with its own ``input_quantizer`` and ``weight_quantizer``: the
      attention output is rounded as it enters the out-projection.

    The forward pass is ``attention.multi_head_attention`` (torch's computation, with ``out_proj`` called as a
    module). Parameters and their state-dict keys are those of the float module.
    """

    float_class = nn.MultiheadAttention
    query_quantizer: nn.Module
    key_quantizer: nn.Module
    value_quantizer: nn.Module

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` on the grids: same arguments and results (``is_causal`` is a hint
        for torch's kernels, which requires the causal ``attn_mask``; that mask is what is computed with)."""
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        q = self.query_quantizer(query)
        k = q if key is query else self.key_quantizer(key)
        v = k if value is key else q if value is query else self.value_quantizer(value)
        weights = [quantizer(getattr(self, name)) for name, quantizer in self.weight_quantizers().items()]
        return multi_head_attention(
            self, q, k, v, weights, key_padding_mask, need_weights, attn_mask, average_attn_weights
        )


_STATIC_CLASSES: dict[type[nn.Module], type[FakeQuantizedModule]] = {
    nn.Conv1d: FakeQuantizedConv1d,
    nn.Conv2d: FakeQuantizedConv2d,
    nn.Conv3d: FakeQuantizedConv3d,
    nn.ConvTranspose1d: FakeQuantizedConvTranspose1d,
    nn.ConvTranspose2d: FakeQuantizedConvTranspose2d,
    nn.ConvTranspose3d: FakeQuantizedConvTranspose3d,
    nn.Linear: FakeQuantizedLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: _FakeQuantizedOutProjection,
    nn.MultiheadAttention: FakeQuantizedMultiheadAttention,
}


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear or MultiheadAttention (or subclass) not
    fake-quantized yet. The out-projection of an attention module is quantized with it, not on its own."""
    return (
        isinstance(module, QUANTIZABLE_TYPES)
        and not isinstance(module, _UNQUANTIZABLE_SUBCLASSES)
        and not isinstance(module, FakeQuantizedModule)
    )


@functools.cache
def _fake_quantized_class(float_class: type[nn.Module]) -> type[FakeQuantizedModule]:
    """The fake-quantized subclass of ``float_class`` (static for torch's own classes, else made once)."""
    if float_class in _STATIC_CLASSES:
        return _STATIC_CLASSES[float_class]
    mixin: type[FakeQuantizedModule]
    if issubclass(float_class, nn.MultiheadAttention):
        mixin = FakeQuantizedMultiheadAttention
    elif issubclass(float_class, nn.Linear):
        mixin = _FakeQuantizedLinear
    elif issubclass(float_class, CONV_TRANSPOSE_TYPES):
        mixin = _FakeQuantizedConvTranspose
    else:
        mixin = _FakeQuantizedConv
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


def _add_quantizers(module: nn.Module, weight: QuantizerConfig, activation: QuantizerConfig | None) -> None:
    """Give ``module`` the quantizers of its weights and inputs (in its train/eval mode) and its fake-quant class."""
    weights, inputs = _quantizer_names(module)
    for name in weights:
        ref = getattr(module, name)
        setattr(module, f"{name}_quantizer", FakeQuantizer(weight, ref.shape[weight.channel_axis]).to(ref.device))
    device = getattr(module, weights[0]).device
    for name in inputs:
        setattr(module, f"{name}_quantizer", FakeQuantizer(activation).to(device) if activation else nn.Identity())
    for name in (*weights, *inputs):
        getattr(module, f"{name}_quantizer").train(module.training)
    _set_class(module, _fake_quantized_class(_unparametrized_class(module)))


def fake_quantize_layer(
    module: nn.Module, weight: QuantizerConfig, activation: QuantizerConfig | None
) -> FakeQuantizedModule:
    """Turn a quantizable layer into its fake-quantized version, in place, and return it.

    Args:
        module: an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear`` or ``nn.MultiheadAttention``
            (see ``is_quantizable``); an attention module's ``out_proj`` is fake-quantized with it, with the same
            configs.
        weight: config of the weight quantizers; per channel, ``channel_axis`` must be the output-channel axis
            of the weight (``weight_channel_axis``: 1 for ConvTranspose, else 0).
        activation: config of the input quantizers, or ``None`` to leave the inputs in float.

    Raises:
        TypeError: ``module`` is of another type, or already fake-quantized.
        ValueError: a per-channel ``weight`` config along another axis than the output channels.
    """
    if not is_quantizable(module):
        raise TypeError(f"{type(module).__name__} cannot be fake-quantized; expected one of {QUANTIZABLE_TYPES}.")
    axis = weight_channel_axis(module)
    if weight.per_channel and weight.channel_axis != axis:
        raise ValueError(
            f"{type(module).__name__} weights hold their output channels on axis {axis}, but the per-channel weight "
            f"config has `channel_axis={weight.channel_axis}`; use `dataclasses.replace(config, channel_axis={axis})`."
        )
    _add_quantizers(module, weight, activation)
    if isinstance(module, nn.MultiheadAttention):
        _add_quantizers(module.out_proj, weight, activation)
    return module  # type: ignore[return-value]


def restore_float_layer(module: FakeQuantizedModule) -> nn.Module:
    """Undo ``fake_quantize_layer`` in place: drop the quantizers and restore the original class."""
    if isinstance(module, FakeQuantizedMultiheadAttention) and isinstance(module.out_proj, FakeQuantizedLayer):
        restore_float_layer(module.out_proj)
    weights, inputs = _quantizer_names(module)
    for name in (*weights, *inputs):
        delattr(module, f"{name}_quantizer")
    _set_class(module, module.float_class)
    return module
